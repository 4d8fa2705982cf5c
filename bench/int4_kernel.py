"""radixserve's int4 kernel against torch's, per SmolLM2-135M layer and decode batch size:
the figures behind `cpu_kernels.max_rows()` (docs/engine.md, "radixserve's int4 kernel").

    .venv/bin/python bench/int4_kernel.py [--threads 1 2] [--rows 1 2 4 8]

Each cell is the best mean of 5 x 300 calls over the four projections of one layer (hot
cache: the weights of one layer fit in L2), with bfloat16 activations at AVX-512 dispatch
and float32 ones below it (the dtype `auto` picks there). Run it under
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 for the
AVX2 class.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from radixserve.layers import cpu_kernels  # noqa: E402
from radixserve.layers.linear import INT4_GROUP, pack_int4  # noqa: E402

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}


def best_us(fn, calls: int = 300, repeat: int = 5) -> float:
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    a = ap.parse_args()
    ok, why = cpu_kernels.available()
    if not ok:
        sys.exit(f"radixserve's int4 kernel is not available here: {why}")
    capability = torch.backends.cpu.get_cpu_capability()
    dtype = torch.bfloat16 if capability.startswith("AVX512") else torch.float32
    print(
        f"torch dispatch {capability}, activations {dtype}, kernel rows: 1-{cpu_kernels.max_rows()}"
    )
    print("| threads | rows | radixserve us/layer | torch us/layer | torch / radixserve |")
    print("|---|---|---|---|---|")
    weights = []
    for n, k in SHAPES.values():
        w = torch.randn(n, k) * 0.02
        weights.append((cpu_kernels.pack(w), pack_int4(w), k))
    for threads in a.threads:
        torch.set_num_threads(threads)
        for rows in a.rows:
            ours = theirs = 0.0
            for packed, (tp, scales), k in weights:
                x = torch.randn(rows, k).to(dtype)
                ours += best_us(lambda x=x, p=packed: cpu_kernels.mm(x, p))
                theirs += best_us(
                    lambda x=x, tp=tp, s=scales: torch.ops.aten._weight_int4pack_mm_for_cpu(
                        x.to(torch.bfloat16), tp, INT4_GROUP, s
                    ).to(x.dtype)
                )
            print(f"| {threads} | {rows} | {ours:.0f} | {theirs:.0f} | {theirs / ours:.2f}x |")


if __name__ == "__main__":
    main()
