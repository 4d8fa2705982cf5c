"""The LoRA delta of one projection (layers/lora.py) timed in process per step shape,
beside the base matmul of the same rows.

    .venv/bin/python bench/lora_delta.py [--threads 2] [--dtype bfloat16|float32]

Shapes are SmolLM2-135M's gate_up projection (576 -> 2 x 1536), 16 adapters of rank 16.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from radixserve.layers.lora import LoraBatch, LoraSlots  # noqa: E402


def best_ms(fn, repeat: int = 5, inner: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t) / inner)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    slots = LoraSlots(16, 16, 576, [1536, 1536], dtype, "cpu")
    for s in range(16):
        for part in range(2):
            slots.write(s, part, torch.randn(16, 576), torch.randn(1536, 16))
    ranks = dict.fromkeys(range(16), 16)
    cases = {
        "decode: 32 rows, 16 adapters": ([i % 16 for i in range(32)], [1] * 32),
        "decode: 32 rows, 4 adapters": ([i % 4 for i in range(32)], [1] * 32),
        "prefill: 4 x 256 rows, 4 adapters": ([0, 1, 2, 3], [256] * 4),
        "mixed: 1 x 512 prefill + 31 decode": ([0, *(i % 16 for i in range(31))], [512] + [1] * 31),
    }
    weight = torch.randn(3072, 576, dtype=dtype)
    print(f"| step ({args.dtype}, {args.threads} threads) | LoRA delta ms | base matmul ms |")
    print("|---|---|---|")
    for name, (req_slots, lens) in cases.items():
        x = torch.randn(sum(lens), 576, dtype=dtype)
        out = torch.zeros(x.shape[0], 3072, dtype=dtype)
        lb = LoraBatch.build(req_slots, lens, ranks, "cpu")
        delta = best_ms(lambda lb=lb, x=x, out=out: slots.add_delta(out, x, lb))
        base = best_ms(lambda x=x: torch.nn.functional.linear(x, weight))
        print(f"| {name} | {delta:.3f} | {base:.3f} |")


if __name__ == "__main__":
    main()
