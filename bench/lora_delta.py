"""The LoRA delta (layers/lora.py) timed in process per step shape, over the four
projections of one layer, beside the base matmuls of the same rows.

    .venv/bin/python bench/lora_delta.py [--threads 1] [--dtype bfloat16|float32]
        [--adapters 16] [--rank 16]

Shapes are SmolLM2-135M's (hidden 576, intermediate 1536, 9 query and 3 KV heads of 64):
qkv (576 -> 576 + 2 x 192, three parts), o (576 -> 576), gate_up (576 -> 2 x 1536, two
parts), down (1536 -> 576); `--adapters` resident adapters of rank `--rank` on all of
them. The plan column is the per-step plan (built once per forward, not per layer).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from radixserve.layers.lora import LoraBatch, LoraSlots  # noqa: E402

PROJECTIONS = {  # name: (in, part sizes)
    "qkv": (576, [576, 192, 192]),
    "o": (576, [576]),
    "gate_up": (576, [1536, 1536]),
    "down": (1536, [576]),
}


def best_ms(fn, repeat: int = 7, inner: int = 20) -> float:
    """Best of `repeat` means; with one thread in this thread's CPU time, which other
    processes' load on a shared machine barely moves (wall time with more threads)."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = clock()
        for _ in range(inner):
            fn()
        best = min(best, (clock() - t) / inner)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    n, r = args.adapters, args.rank
    ranks = dict.fromkeys(range(n), r)
    projections = []
    for fan_in, parts in PROJECTIONS.values():
        slots = LoraSlots(n, r, fan_in, parts, dtype, "cpu")
        for s in range(n):
            for part, out in enumerate(parts):
                slots.write(s, part, torch.randn(r, fan_in) * 0.01, torch.randn(out, r) * 0.01)
        projections.append((slots, torch.randn(sum(parts), fan_in, dtype=dtype)))
    cases = {
        "decode: 32 rows, 1 adapter": ([0] * 32, [1] * 32),
        "decode: 32 rows, 4 adapters": ([i % 4 for i in range(32)], [1] * 32),
        f"decode: 32 rows, {n} adapters": ([i % n for i in range(32)], [1] * 32),
        f"decode: 64 rows, {n} adapters": ([i % n for i in range(64)], [1] * 64),
        "prefill: 4 x 256 rows, 4 adapters": ([0, 1, 2, 3], [256] * 4),
        "mixed: 1 x 512 prefill + 31 decode": ([0, *(i % n for i in range(31))], [512] + [1] * 31),
    }
    print(
        f"| step ({args.dtype}, {args.threads} threads, {n} adapters of rank {r}) | form "
        "| plan ms | LoRA delta ms (4 projections) | base matmuls ms |"
    )
    print("|---|---|---|---|---|")
    for name, (req_slots, lens) in cases.items():
        lb = LoraBatch.build(req_slots, lens, ranks, "cpu")
        plan = best_ms(lambda s=req_slots, lens=lens: LoraBatch.build(s, lens, ranks, "cpu"))
        inputs = []
        for slots, weight in projections:
            x = torch.randn(sum(lens), slots.a.shape[-1], dtype=dtype)
            inputs.append((slots, weight, x, torch.zeros(x.shape[0], weight.shape[0], dtype=dtype)))

        def delta(lb=lb, inputs=inputs) -> None:
            for slots, _, x, out in inputs:
                slots.add_delta(out, x, lb)

        def base(inputs=inputs) -> None:
            for _, weight, x, _ in inputs:
                torch.nn.functional.linear(x, weight)

        form = "+".join(["segments"] * bool(lb.segments) + [lb.mode] * (lb.mode != "none"))
        print(f"| {name} | {form} | {plan:.3f} | {best_ms(delta):.3f} | {best_ms(base):.3f} |")


if __name__ == "__main__":
    main()
