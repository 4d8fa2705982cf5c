"""The expert layer on a GPU: torch's grouped GEMM (F.grouped_mm, what FusedMoE takes on
CUDA in bfloat16) against the looped path (one matmul pair per expert), on one layer shaped
like gpt-oss-20b's and one like Qwen3-30B-A3B's, over step sizes from one decoding token to
a 4096-token prefill. For each: the largest difference between the two outputs (relative to
the output's largest magnitude; bfloat16 kernels round differently) and the median time of
each path, CUDA events around 20 runs after 3 warm-ups.

    python3 bench/gpu/moe_grouped.py [--out FOLDER]    # on the GPU machine, seconds

Needs only torch and the server's source (PYTHONPATH=server, or run_gpu_bench.py's `moe`
phase). Writes moe-grouped.csv and moe-grouped.md to --out (default $OUT or
bench/results/gpu-<date>/).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from datetime import date
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "server"))
sys.path.insert(0, str(ROOT / "bench"))
from radixserve.engine.cpu_path import cpu_class  # noqa: E402
from radixserve.layers.moe import FusedMoE, softmax_topk, topk_softmax  # noqa: E402
from radixserve.models.gpt_oss import clamped_swiglu  # noqa: E402
from run_peers import cpu_model  # noqa: E402

# name -> (experts, hidden, intermediate, top k, gpt-oss style (biases, clamped SwiGLU))
LAYERS = {
    "gpt-oss-20b": (32, 2880, 2880, 4, True),
    "qwen3-30b-a3b": (128, 2048, 768, 8, False),
}
TOKENS = (1, 8, 64, 512, 4096)
COLUMNS = ["layer", "tokens", "max_rel_diff", "looped_ms", "grouped_ms", "speedup"]


def build(experts: int, hidden: int, inter: int, gpt_oss: bool) -> FusedMoE:
    act = {"activation": partial(clamped_swiglu, alpha=1.702, limit=7.0)} if gpt_oss else {}
    moe = FusedMoE(experts, hidden, inter, bias=gpt_oss, **act)
    moe = moe.to(device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02)
    return moe


def median_ms(fn, *args, runs: int = 20) -> float:
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_layer(name: str) -> list[dict]:
    experts, hidden, inter, top_k, gpt_oss = LAYERS[name]
    moe = build(experts, hidden, inter, gpt_oss)
    router = torch.randn(experts, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    rows = []
    for tokens in TOKENS:
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        logits = x @ router.T
        weights, ids = topk_softmax(logits, top_k) if gpt_oss else softmax_topk(logits, top_k, True)
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        sorted_x, sorted_ids = x[order // top_k], flat[order]
        assert moe._grouped_mm_fits(x), "grouped_mm does not take this device/dtype/shape"
        with torch.no_grad():
            want = moe._experts_looped(sorted_x, sorted_ids).float()
            got = moe._experts_grouped(sorted_x, sorted_ids).float()
            diff = ((got - want).abs().max() / want.abs().max()).item()
            looped = median_ms(moe._experts_looped, sorted_x, sorted_ids)
            grouped = median_ms(moe._experts_grouped, sorted_x, sorted_ids)
        row = dict(layer=name, tokens=tokens, max_rel_diff=f"{diff:.2e}")
        row |= dict(looped_ms=f"{looped:.3f}", grouped_ms=f"{grouped:.3f}")
        row["speedup"] = f"{looped / grouped:.2f}"
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = os.environ.get("OUT") or ROOT / "bench" / "results" / f"gpu-{date.today()}"
    ap.add_argument("--out", type=Path, default=Path(default_out))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 1
    rows = []
    for name in LAYERS:
        rows += run_layer(name)
        torch.cuda.empty_cache()  # the layer's weights, before the next one's
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "moe-grouped.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    device = torch.cuda.get_device_name()
    lines = [f"# Expert layer: grouped GEMM vs looped, {device}, torch {torch.__version__}", ""]
    host = f"{cpu_model()}, cpu class {cpu_class()[0]}, {os.cpu_count()} cores"
    lines += [f"Host CPU (launches the kernels; the times are the GPU's): {host}.", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    (args.out / "moe-grouped.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
