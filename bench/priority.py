"""How long an urgent request waits behind a burst of batch traffic, with and without
--enable-priority-scheduling (not part of `make test`).

For each mode a server starts on 127.0.0.1 with --max-running-requests R. The time to first
token of an urgent request (priority -1, streamed) is measured on the idle server, then again
while a burst of --burst low-priority requests (priority 1, --burst-tokens each) keeps the
engine full and its queue long. The report gives both TTFTs and their ratio per mode; with
priorities the urgent request should wait about one engine step plus its own prefill.
Writes bench/results/priority-<time>.csv and .md.

    python bench/priority.py
    python bench/priority.py --burst 64 --max-running 8
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import statistics
import time
from pathlib import Path

import httpx
from local_server import cpu_line, serve

RESULTS_DIR = Path(__file__).resolve().parent / "results"
URGENT_PROMPT = "Answer in one word: what colour is the sky?"


async def ttft(c: httpx.AsyncClient, url: str, priority: int) -> float:
    body = {"prompt": URGENT_PROMPT, "max_tokens": 4, "stream": True, "temperature": 0}
    if priority:
        body["priority"] = priority
    t0 = time.perf_counter()
    async with c.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - t0
    raise RuntimeError("no token came")


async def measure(url: str, args, priorities: bool) -> dict:
    urgent, low = (-1, 1) if priorities else (0, 0)
    async with httpx.AsyncClient(timeout=600) as c:
        idle = [await ttft(c, url, urgent) for _ in range(args.repeats)]
        body = {"prompt": "Write a long story about a ship.", "max_tokens": args.burst_tokens,
                "ignore_eos": True, "temperature": 0}  # fmt: skip
        if low:
            body["priority"] = low
        burst = [
            asyncio.create_task(c.post(url + "/v1/completions", json=body))
            for _ in range(args.burst)
        ]
        await asyncio.sleep(args.settle)  # the engine is full and the queue long
        loaded = []
        for _ in range(args.repeats):
            loaded.append(await ttft(c, url, urgent))
        for t in burst:
            t.cancel()
        await asyncio.gather(*burst, return_exceptions=True)
    return {"idle": statistics.median(idle), "loaded": statistics.median(loaded)}


def run_mode(args, priorities: bool) -> dict:
    flags = ["--max-running-requests", str(args.max_running)]
    if priorities:
        flags.append("--enable-priority-scheduling")
    with serve(flags, "priority-") as (url, _):
        return asyncio.run(measure(url, args, priorities))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--burst", type=int, default=32, help="low-priority requests in the burst")
    ap.add_argument("--burst-tokens", type=int, default=256)
    ap.add_argument("--max-running", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="urgent requests per measurement")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds before measuring")
    args = ap.parse_args()
    rows = []
    for priorities in (False, True):
        r = run_mode(args, priorities)
        rows.append({
            "cpu": cpu_line(),
            "mode": "priority" if priorities else "fcfs",
            "ttft_idle_s": round(r["idle"], 3),
            "ttft_under_burst_s": round(r["loaded"], 3),
            "ratio": round(r["loaded"] / r["idle"], 2),
        })  # fmt: skip
        print(rows[-1], flush=True)
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = RESULTS_DIR / f"priority-{time.strftime('%Y-%m-%d-%H%M')}"
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    setup = (f"{cpu_line()}; burst of {args.burst} x {args.burst_tokens} tokens, --max-running-requests "
             f"{args.max_running}, median of {args.repeats}; load average "
             f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    lines = ["| mode | TTFT idle (s) | TTFT under burst (s) | ratio |", "|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['ttft_idle_s']} | {r['ttft_under_burst_s']} | {r['ratio']} |"
              for r in rows]  # fmt: skip
    Path(f"{stem}.md").write_text(
        f"# Urgent TTFT behind a burst\n\n{setup}\n\n" + "\n".join(lines) + "\n"
    )
    print("\n".join(lines))
    print(f"wrote {stem}.csv and .md")


if __name__ == "__main__":
    main()
