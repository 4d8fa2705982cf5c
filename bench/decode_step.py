"""In-process decode-step time of the default model per CPU path: the table in
docs/engine.md and bench/results/README.md ("Where a decode step goes").

    .venv/bin/python bench/decode_step.py [--paths float32:none float32:int4 ...]
        [--batches 1 8 32] [--context 256] [--profile] [--layer-by-layer] [--split]

Each path is `dtype:quantization`; every batch runs `--context` tokens of KV per request
and prints the best of 3 timed runs of 8 steps. `--profile` prints torch's operator table
for batch 1 of each path. `--layer-by-layer` turns off the int4 path's one-call decode
step (layers/cpu_decode.py), to compare the two; `--split` also prints, per batch, the
best layers-only and LM-head-only times of the same step. Run it under ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2 for the AVX2 class.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from radixserve.config import ServerArgs  # noqa: E402
from radixserve.engine import cpu_path  # noqa: E402
from radixserve.engine.model_runner import ModelRunner  # noqa: E402
from radixserve.layers.attention import ForwardBatch  # noqa: E402


def decode_batch(runner: ModelRunner, batch: int, context: int) -> ForwardBatch:
    slots = [runner.pool.alloc(context + 1) for _ in range(batch)]
    return ForwardBatch(
        input_ids=torch.randint(0, 1000, (batch,)),
        positions=torch.full((batch,), context),
        out_cache_loc=torch.stack([s[-1] for s in slots]),
        kv_pool=runner.pool,
        num_prefill_reqs=0,
        num_prefill_tokens=0,
        prefix_lens=[context] * batch,
        extend_lens=[1] * batch,
        req_slots=slots,
    )


@torch.inference_mode()
def step_ms(runner: ModelRunner, batch: ForwardBatch, steps: int = 8, repeats: int = 3) -> float:
    rows = torch.arange(batch.batch_size)
    for _ in range(3):
        runner.forward(batch, rows)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            runner.forward(batch, rows)
        best = min(best, (time.perf_counter() - start) / steps * 1e3)
    return best


@torch.inference_mode()
def split_ms(runner: ModelRunner, batch: ForwardBatch, steps: int = 24) -> tuple[float, float]:
    """Best layers (embedding to final norm) and best LM head time of one step, apart."""
    layers = head = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        runner.backend.init_forward(batch)
        hidden = runner.model(batch)
        mid = time.perf_counter()
        runner.model.compute_logits(hidden)
        layers, head = min(layers, mid - start), min(head, time.perf_counter() - mid)
    return layers * 1e3, head * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--paths", nargs="+", default=["float32:none", "float32:int4"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--layer-by-layer", action="store_true")
    ap.add_argument("--split", action="store_true")
    a = ap.parse_args()
    klass, capability = cpu_path.cpu_class()
    print(f"class {klass} (torch {capability}), {torch.get_num_threads()} threads")
    for path in a.paths:
        dtype, quant = path.split(":")
        runner = ModelRunner(ServerArgs(device="cpu", dtype=dtype, quantization=quant,
                                        max_total_tokens=(a.context + 1) * max(a.batches)))  # fmt: skip
        if a.layer_by_layer:
            runner.model.fused_decode = None
        times = []
        for b in a.batches:
            batch = decode_batch(runner, b, a.context)
            times.append(f"batch {b}: {step_ms(runner, batch):.1f} ms")
            if a.split:
                times[-1] += " (layers {:.1f}, head {:.1f})".format(*split_ms(runner, batch))
            for slots in batch.req_slots:
                runner.pool.free(slots)
        print(f"{dtype} + {quant}: " + ", ".join(times), flush=True)
        if a.profile:
            from torch.profiler import ProfilerActivity, profile

            batch = decode_batch(runner, 1, a.context)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step_ms(runner, batch, steps=10, repeats=1)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        del runner


if __name__ == "__main__":
    main()
