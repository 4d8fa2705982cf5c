"""The LoRA delta of one projection, both ways `layers/lora.py` can compute it, timed in
process: the padded batched matmul (torch.bmm over every slot) and the per-adapter loop.
The figures behind `PAD_WASTE` (bench/results/README.md, "Multi-LoRA").

    .venv/bin/python bench/lora_delta.py [--threads 2]

Shapes are SmolLM2-135M's gate_up projection (576 -> 2 x 1536), 16 adapters of rank 16.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from radixserve.layers import lora  # noqa: E402
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
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    slots = LoraSlots(16, 16, 576, [1536, 1536], torch.float32, "cpu")
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
    print("| step | padded bmm ms | per-adapter loop ms | base matmul ms | chosen |")
    print("|---|---|---|---|---|")
    weight = torch.randn(3072, 576)
    for name, (req_slots, lens) in cases.items():
        x = torch.randn(sum(lens), 576)
        out = torch.zeros(x.shape[0], 3072)
        times = {}
        for mode, waste in (("padded", float("inf")), ("loop", 0.0)):
            lora.PAD_WASTE = waste
            lb = LoraBatch.build(req_slots, lens, ranks, "cpu")
            times[mode] = best_ms(lambda lb=lb, x=x, out=out: slots.add_delta(out, x, lb))
        lora.PAD_WASTE = 2.0
        chosen = "padded" if LoraBatch.build(req_slots, lens, ranks, "cpu").padded else "loop"
        base = best_ms(lambda x=x: torch.nn.functional.linear(x, weight))
        print(f"| {name} | {times['padded']:.3f} | {times['loop']:.3f} | {base:.3f} | {chosen} |")


if __name__ == "__main__":
    main()
