"""Whole engine steps of the default model with 16 LoRA adapters against the base model, in
process: the decode, prefill and mixed steps that bench/lora.py's served run is made of.

    GOMP_SPINCOUNT=2000 .venv/bin/python bench/lora_step.py [--threads 2] [--adapters 16]
        [--rank 16] [--steps decode32 prefill32x128 ...] [--profile STEP]

The model runner is the server's (ModelRunner, its dtype and quantization choice, its
one-thread rule for single-stream steps, the LM head); the adapters are bench/lora.py's
random ones, every one resident. Each step is timed as the best of 3 runs of `--repeat`
forwards, in wall time (the server's steps run on `--threads` threads), for the base model
(every request on slot -1) and for the requests spread round-robin over the adapters.
`--profile STEP` prints torch's operator table for that step, base and adapters.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "server"))
sys.path.insert(0, str(ROOT / "bench"))

from lora import write_adapter  # noqa: E402
from radixserve.config import ServerArgs  # noqa: E402
from radixserve.engine.model_runner import ModelRunner  # noqa: E402
from radixserve.layers.attention import ForwardBatch  # noqa: E402

CONTEXT = 160  # decode rows' KV: a 128-token prompt and half of 64 outputs

# name: (prefill rows per request, decode requests)
STEPS = {
    "decode32": ([], 32),
    "decode8": ([], 8),
    "prefill32x128": ([128] * 32, 0),
    "prefill4x128": ([128] * 4, 0),
    "mixed4x128+28": ([128] * 4, 28),
    "mixed1x128+31": ([128], 31),
}


def make_batch(runner: ModelRunner, prefill: list[int], decode: int, slots: list[int]):
    req_slots, prefix, extend, loc, pos = [], [], [], [], []
    for n in prefill:
        s = runner.pool.alloc(n)
        req_slots.append(s)
        prefix.append(0)
        extend.append(n)
        loc.append(s)
        pos += range(n)
    for _ in range(decode):
        s = runner.pool.alloc(CONTEXT + 1)
        req_slots.append(s)
        prefix.append(CONTEXT)
        extend.append(1)
        loc.append(s[-1:])
        pos.append(CONTEXT)
    rows = sum(extend)
    batch = ForwardBatch(
        input_ids=torch.randint(0, 1000, (rows,)),
        positions=torch.tensor(pos),
        out_cache_loc=torch.cat(loc),
        kv_pool=runner.pool,
        num_prefill_reqs=len(prefill),
        num_prefill_tokens=sum(prefill),
        prefix_lens=prefix,
        extend_lens=extend,
        req_slots=req_slots,
        lora_slots=slots,
    )
    logit_rows = torch.tensor(list(torch.tensor(extend).cumsum(0) - 1))
    return batch, logit_rows


def step_ms(runner, batch, rows, repeat: int) -> float:
    """Best of 3 means; with one thread in this thread's CPU time, which other processes'
    load on a shared machine barely moves (wall time with more threads)."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    for _ in range(2):
        runner.forward(batch, rows)
    best = float("inf")
    for _ in range(3):
        t = clock()
        for _ in range(repeat):
            runner.forward(batch, rows)
        best = min(best, (clock() - t) / repeat)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", nargs="+", default=list(STEPS))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--profile", default=None, help="a step name to profile")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n = args.adapters
    with tempfile.TemporaryDirectory() as tmp:
        runner = ModelRunner(
            ServerArgs(
                device="cpu",
                enable_lora=True,
                max_loras=n,
                max_lora_rank=args.rank,
                max_total_tokens=64 * 1024,
            )  # fmt: skip
        )
        for i in range(n):
            write_adapter(Path(tmp, f"a{i}"), runner.config, args.rank, seed=i)
            runner.lora.load(f"a{i}", f"{tmp}/a{i}", f"{tmp}/a{i}")
        slot_of = [runner.lora.acquire(f"a{i}") for i in range(n)]
    print(
        f"{runner.dtype} + {runner.quantization}, {args.threads} threads, {n} adapters of "
        f"rank {args.rank}"
    )
    print("| step | rows | base ms | adapters ms | base / adapters |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for name in args.steps:
            prefill, decode = STEPS[name]
            reqs = len(prefill) + decode
            spread = [slot_of[i % n] for i in range(reqs)]
            batch, rows = make_batch(runner, prefill, decode, [-1] * reqs)
            base = step_ms(runner, batch, rows, args.repeat)
            batch.lora_slots = spread
            lora = step_ms(runner, batch, rows, args.repeat)
            print(f"| {name} | {batch.input_ids.numel()} | {base:.1f} | {lora:.1f} "
                  f"| {base / lora:.2f} |", flush=True)  # fmt: skip
            if name == args.profile:
                from torch.profiler import ProfilerActivity, profile

                for label, slots in (("base", [-1] * reqs), ("adapters", spread)):
                    batch.lora_slots = slots
                    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                        for _ in range(args.repeat):
                            runner.forward(batch, rows)
                    print(f"--- {name}, {label}, {args.repeat} steps")
                    print(
                        prof.key_averages(group_by_input_shape=True).table(
                            sort_by="self_cpu_time_total", row_limit=40
                        )
                    )
            for s in batch.req_slots:
                runner.pool.free(s)


if __name__ == "__main__":
    main()
