"""`make soak`: minutes of mixed load against a radixserve server this script starts on
127.0.0.1 (not part of `make test`).

Clients loop over a fixed mix: plain completions, streamed chats, native /generate with n=2,
streams the client abandons after a few events, and bad requests that must be 400s. Every
--sample-s seconds a row records the outcomes since the last row, generated tokens per
second, the resident memory (VmRSS from /proc/<pid>/status) of the HTTP process and of the
engine process, KV usage and open sequences. At the end the server must drain to idle (no
open sequence, no KV held) and exit 0 on SIGTERM. Writes bench/results/soak-<time>.csv,
.png and -summary.md; exits 1 when any request failed unexpectedly or the server leaked.

    make soak                       # 10 minutes
    make soak SOAK_MINUTES=1        # a quick check
    python bench/soak.py --minutes 3 --clients 8 -- --max-running-requests 16
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
# a KV pool the load fills, so the prefix cache evicts all the time (the default is ~130k tokens)
DEFAULT_FLAGS = ["--max-total-tokens", "16384"]
CLIENT_TIMEOUT_S = 120.0  # a request slower than this counts as a hang
# (weight, kind): what the clients send
MIX = [(35, "completion"), (25, "chat_stream"), (10, "generate_n2"), (15, "abandon"), (15, "bad")]
BAD_REQUESTS = [
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_k": 10**30}),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}),
    ("/v1/completions", {"prompt": [10**9]}),
    ("/v1/completions", {"prompt": "hi", "stop": ["x"] * 40}),
    ("/generate", {"text": "", "sampling_params": {}}),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": "many"}}),
]
PROMPTS = [
    "Tell me about the history of Rome.",
    "Write a haiku about the sea.",
    "Explain how a bicycle works.",
    "What is the capital of France?",
    "List five fruits and their colors.",
    "Describe a sunrise over the mountains.",
]
OUTCOMES = ["ok", "rejected_400", "abandoned", "overloaded_503", "error"]


@dataclass
class Tally:
    """Outcomes and errors since the last sample (the sampler swaps it out)."""

    counts: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process from /proc (no psutil), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None


def scrape(text: str) -> dict[str, float]:
    """The unlabelled samples of a Prometheus text page."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            out[name] = float(value)
    return out


async def one_request(h: httpx.AsyncClient, kind: str, rng: random.Random, tally: Tally) -> None:
    prompt = rng.choice(PROMPTS)
    max_tokens = rng.randint(8, 64)
    try:
        if kind == "bad":
            path, body = rng.choice(BAD_REQUESTS)
            r = await h.post(path, json=body)
            expect(tally, r.status_code == 400, f"bad request {path} got {r.status_code}", r)
            tally.counts["rejected_400" if r.status_code == 400 else "error"] += 1
            return
        if kind == "completion":
            body = {"prompt": prompt, "max_tokens": max_tokens}
            r = await h.post("/v1/completions", json=body)
        elif kind == "generate_n2":
            sp = {"max_new_tokens": max_tokens, "n": 2, "temperature": 0.8}
            r = await h.post("/generate", json={"text": prompt, "sampling_params": sp})
        else:
            body = {
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "stream": True,
            }
            await stream_chat(h, body, kind == "abandon", rng, tally)
            return
        if r.status_code == 503 and r.json()["error"]["code"] == "server_overloaded":
            tally.counts["overloaded_503"] += 1
            return
        expect(tally, r.status_code == 200, f"{kind} got {r.status_code}", r)
        tally.counts["ok" if r.status_code == 200 else "error"] += 1
    except (httpx.TimeoutException, httpx.TransportError) as e:
        tally.counts["error"] += 1
        tally.errors.append(f"{kind}: {type(e).__name__}: {e}")


async def stream_chat(
    h: httpx.AsyncClient, body: dict, abandon: bool, rng: random.Random, tally: Tally
) -> None:
    leave_after = rng.randint(1, 6) if abandon else None
    async with h.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            ok = r.status_code == 503
            expect(tally, ok, f"stream got {r.status_code}", r)
            tally.counts["overloaded_503" if ok else "error"] += 1
            return
        events = 0
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                events += 1
                if '"error"' in line[:20]:
                    tally.counts["error"] += 1
                    tally.errors.append(f"stream error event: {line[:300]}")
                    return
                if leave_after is not None and events >= leave_after:
                    tally.counts["abandoned"] += 1
                    return  # closing the half-read response drops the connection
            elif line == "data: [DONE]":
                tally.counts["ok"] += 1
                return
    tally.counts["error"] += 1
    tally.errors.append("stream ended without [DONE]")


def expect(tally: Tally, ok: bool, what: str, r: httpx.Response) -> None:
    if not ok:
        tally.errors.append(f"{what}: {r.text[:300]}")


async def client_loop(h: httpx.AsyncClient, seed: int, deadline: float, tally_ref: list) -> None:
    rng = random.Random(seed)
    kinds = [k for w, k in MIX for _ in range(w)]
    while time.monotonic() < deadline:
        await one_request(h, rng.choice(kinds), rng, tally_ref[0])


async def sampler(
    h: httpx.AsyncClient,
    api_pid: int,
    engine_pid: int,
    tally_ref: list,
    rows: list[dict],
    every: float,
    stop: asyncio.Event,
) -> None:
    started = time.monotonic()
    last_t = started
    last_gen = scrape((await h.get("/metrics")).text).get("radixserve_generation_tokens_total", 0)
    while True:
        stopped = False
        try:
            await asyncio.wait_for(stop.wait(), every)
            stopped = True
        except TimeoutError:
            pass
        m = scrape((await h.get("/metrics")).text)
        now = time.monotonic()
        tally, tally_ref[0] = tally_ref[0], Tally()
        gen = m.get("radixserve_generation_tokens_total", 0.0)
        dt = now - last_t
        row = {
            "t_s": round(now - started, 1),
            **{o: tally.counts[o] for o in OUTCOMES},
            "requests_per_s": round(sum(tally.counts.values()) / dt, 2),
            "gen_tokens_per_s": round((gen - last_gen) / dt, 1),
            "rss_api_mb": round(rss_mb(api_pid) or 0, 1),
            "rss_engine_mb": round(rss_mb(engine_pid) or 0, 1),
            "kv_usage": round(m.get("radixserve_kv_cache_usage_ratio", 0.0), 4),
            "open_sequences": m.get("radixserve_open_sequences", 0.0),
        }
        if not stopped or dt >= every / 2:  # a last sliver of a sample would be all noise
            rows.append(row)
        for e in tally.errors[:5]:
            print("  error:", e, flush=True)
        print(
            f"[{row['t_s']:7.1f}s] ok {row['ok']:4d}  400 {row['rejected_400']:3d}  "
            f"left {row['abandoned']:3d}  503 {row['overloaded_503']:3d}  err {row['error']:2d}  "
            f"{row['gen_tokens_per_s']:7.1f} tok/s  RSS api {row['rss_api_mb']:.0f} MB "
            f"engine {row['rss_engine_mb']:.0f} MB  KV {row['kv_usage']:.3f}",
            flush=True,
        )
        last_t, last_gen = now, gen
        if stopped:
            return


def start_server(port: int, flags: list[str], log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "radixserve.cli", "serve", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), *flags]
    print("+", " ".join(cmd), flush=True)
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} while loading")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("server not healthy in time")


async def drained(h: httpx.AsyncClient, timeout: float = 60) -> dict[str, float]:
    """/metrics once nothing is open and no KV is held by requests (or after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape((await h.get("/metrics")).text)
        idle = (
            m.get("radixserve_open_sequences", 1) == 0
            and m.get("radixserve_num_running_reqs", 1) == 0
        )
        if (
            idle and m.get("radixserve_kv_cache_usage_ratio", 1) == 0
        ) or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.5)


async def soak(url: str, api_pid: int, minutes: float, clients: int, every: float) -> tuple:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT_S, limits=limits) as h:
        engine_pid = (await h.get("/server_info")).json()["engine_pid"]
        tally_ref = [Tally()]
        rows: list[dict] = []
        stop = asyncio.Event()
        sampling = asyncio.create_task(
            sampler(h, api_pid, engine_pid, tally_ref, rows, every, stop)
        )
        deadline = time.monotonic() + minutes * 60
        await asyncio.gather(*(client_loop(h, i, deadline, tally_ref) for i in range(clients)))
        stop.set()
        await sampling
        final = await drained(h)
    return rows, final, engine_pid


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] / 60 for r in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    ax1.plot(t, [r["gen_tokens_per_s"] for r in rows], label="generated tokens/s")
    ax1.set_ylabel("tokens/s")
    ax1r = ax1.twinx()
    ax1r.plot(t, [r["requests_per_s"] for r in rows], color="tab:orange", label="requests/s")
    ax1r.set_ylabel("requests/s")
    ax1.legend(loc="lower left")
    ax1r.legend(loc="lower right")
    for key, name in (("rss_api_mb", "HTTP process"), ("rss_engine_mb", "engine process")):
        base = rows[0][key]
        ax2.plot(t, [r[key] - base for r in rows], label=f"{name} (from {base:.0f} MB)")
    ax2.set_ylabel("RSS growth (MB)")
    ax2.legend(loc="upper left")
    errors, total = [], 0
    for r in rows:
        total += r["error"]
        errors.append(total)
    ax3.plot(t, errors, color="red", label="unexpected errors (cumulative)")
    ax3.set_ylabel("errors")
    ax3.set_xlabel("minutes")
    ax3.legend(loc="upper left")
    ax3r = ax3.twinx()
    ax3r.plot(t, [r["kv_usage"] for r in rows], color="gray", label="KV usage ratio")
    ax3r.set_ylabel("KV usage")
    ax3r.legend(loc="upper right")
    for ax in (ax1, ax1r, ax3r):
        ax.set_ylim(bottom=0)
    ax3.set_ylim(0, max(1, total) * 1.1)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def summarize(rows: list[dict], final: dict, exit_code: int, args) -> tuple[str, bool]:
    totals = Counter()
    for r in rows:
        totals.update({o: r[o] for o in OUTCOMES})
    steady = rows[1:] or rows  # the first sample includes warm-up
    minute = max(1, int(60 / args.sample_s))
    first, last = rows[:minute], rows[-minute:]

    def mean(rs, key):
        return sum(r[key] for r in rs) / len(rs)

    leaked = (
        final.get("radixserve_open_sequences", 0) != 0
        or final.get("radixserve_kv_cache_usage_ratio", 0) != 0
    )
    lines = [
        f"# Soak {time.strftime('%Y-%m-%d %H:%M')}: {args.minutes:g} min, {args.clients} clients",
        "",
        f"- server flags: `{' '.join(args.server_flags)}`",
        f"- requests: {sum(totals.values())} ({', '.join(f'{o} {totals[o]}' for o in OUTCOMES)})",
        f"- unexpected errors: {totals['error']}",
        f"- generated tokens/s: first minute {mean(first, 'gen_tokens_per_s'):.1f}, "
        f"last minute {mean(last, 'gen_tokens_per_s'):.1f}",
        f"- RSS HTTP process: {steady[0]['rss_api_mb']:.0f} MB -> {rows[-1]['rss_api_mb']:.0f} MB "
        f"(max {max(r['rss_api_mb'] for r in rows):.0f})",
        f"- RSS engine process: {steady[0]['rss_engine_mb']:.0f} MB -> "
        f"{rows[-1]['rss_engine_mb']:.0f} MB (max {max(r['rss_engine_mb'] for r in rows):.0f})",
        f"- after the load: open sequences {final.get('radixserve_open_sequences', -1):.0f}, "
        f"KV usage {final.get('radixserve_kv_cache_usage_ratio', -1):.3f}",
        f"- SIGTERM: exit code {exit_code}",
    ]
    ok = totals["error"] == 0 and not leaked and exit_code == 0
    return "\n".join(lines) + "\n", ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", 10)))
    p.add_argument("--clients", type=int, default=8, help="concurrent client loops")
    p.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument(
        "server_flags",
        nargs="*",
        help=f"flags for `radixserve serve` after -- (default: {' '.join(DEFAULT_FLAGS)})",
    )
    args = p.parse_args(argv)
    args.server_flags = args.server_flags or DEFAULT_FLAGS
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"soak-{time.strftime('%Y-%m-%d-%H%M')}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(tempfile.mkstemp(prefix="radixserve-soak-", suffix=".log")[1])
    proc = start_server(port, args.server_flags, log_path)
    try:
        wait_healthy(url, proc)
        print(f"soaking {url} for {args.minutes:g} min with {args.clients} clients", flush=True)
        rows, final, _ = asyncio.run(soak(url, proc.pid, args.minutes, args.clients, args.sample_s))
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    write_csv(rows, stem.with_suffix(".csv"))
    plot(rows, stem.with_suffix(".png"), f"radixserve soak, {args.clients} clients")
    summary, ok = summarize(rows, final, exit_code, args)
    Path(f"{stem}-summary.md").write_text(summary)
    print(summary)
    print(f"wrote {stem}.csv, {stem}.png, {stem}-summary.md (server log {log_path})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
