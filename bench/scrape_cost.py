"""What a /metrics scrape costs the server under load (the Inference Extension's picker scrapes
every pod every 50 ms: 20 scrapes a second).

Starts `radixserve serve` on 127.0.0.1, runs the same streaming load twice for --seconds each,
once alone and once with a scraper at --rate Hz, and reports the scrape latency (p50/p99/max),
the HTTP process's CPU seconds per scrape (from /proc/<pid>/stat, the difference between the
two phases) and the output throughput of both phases. Writes
bench/results/scrape-cost-<time>.csv and .md. Not part of `make test`.

    python bench/scrape_cost.py                       # 20 Hz, concurrency 8, 30 s a phase
    python bench/scrape_cost.py --rate 50 -- --dtype float32
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
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (the HTTP process answers /metrics)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def load(url: str, concurrency: int, until: float) -> int:
    """Streaming completions until `until`; returns the tokens generated."""
    body = {"prompt": "Tell me a long story about a lighthouse keeper.", "max_tokens": 64,
            "ignore_eos": True, "stream": True}  # fmt: skip
    tokens = 0

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal tokens
        while time.monotonic() < until:
            async with c.stream("POST", url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        tokens += 1

    async with httpx.AsyncClient(timeout=300) as c:
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
    return tokens


async def scraper(url: str, rate: float, until: float) -> list[float]:
    """Scrape at `rate` Hz until `until`; each scrape's latency in seconds."""
    latencies = []
    async with httpx.AsyncClient(timeout=30) as c:
        while time.monotonic() < until:
            t0 = time.perf_counter()
            r = await c.get(url + "/metrics")
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(max(0.0, 1 / rate - (time.perf_counter() - t0)))
    return latencies


async def phase(url: str, pid: int, args, scrape: bool) -> dict:
    until = time.monotonic() + args.seconds
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    jobs = [load(url, args.concurrency, until)]
    if scrape:
        jobs.append(scraper(url, args.rate, until))
    results = await asyncio.gather(*jobs)
    wall = time.monotonic() - t0
    return {"tokens": results[0], "wall": wall, "cpu": cpu_seconds(pid) - cpu0,
            "latencies": results[1] if scrape else []}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=20.0, help="scrapes per second")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    ap.add_argument("server_args", nargs="*", help="after --: flags for radixserve serve")
    args = ap.parse_args()

    with serve(args.server_args, "scrape-cost-") as (url, proc):
        alone = asyncio.run(phase(url, proc.pid, args, scrape=False))
        scraped = asyncio.run(phase(url, proc.pid, args, scrape=True))

    lat = sorted(scraped["latencies"])
    n = len(lat)
    extra_cpu = scraped["cpu"] / scraped["wall"] - alone["cpu"] / alone["wall"]
    row = {
        "cpu": cpu_line(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "rate_hz": args.rate,
        "achieved_hz": round(n / args.seconds, 2),
        "concurrency": args.concurrency,
        "scrapes": n,
        "latency_p50_ms": round(1000 * statistics.median(lat), 2),
        "latency_p99_ms": round(1000 * lat[min(n - 1, int(0.99 * n))], 2),
        "latency_max_ms": round(1000 * lat[-1], 2),
        "http_cpu_share_alone": round(alone["cpu"] / alone["wall"], 3),
        "http_cpu_share_scraped": round(scraped["cpu"] / scraped["wall"], 3),
        "cpu_ms_per_scrape": round(1000 * extra_cpu * scraped["wall"] / n, 3),
        "tok_s_alone": round(alone["tokens"] / alone["wall"], 1),
        "tok_s_scraped": round(scraped["tokens"] / scraped["wall"], 1),
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = RESULTS_DIR / f"scrape-cost-{time.strftime('%Y-%m-%d-%H%M')}"
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        w.writeheader()
        w.writerow(row)
    lines = ["| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in row.items())]
    Path(f"{stem}.md").write_text("# /metrics scrape cost\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem}.csv and .md")


if __name__ == "__main__":
    main()
