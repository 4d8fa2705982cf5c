"""Cross-check a headline ratio with a second, independent client: vLLM's guidellm.

`radixserve bench` measures every figure in bench/results; a client can bias what it
measures (its CPU share on 2 cores, how it counts tokens, when it starts the clock). This
runs radixserve and llama.cpp's llama-server one after another on the same GGUF, each
alone, and drives both with guidellm (synthetic text of the given prompt/output lengths,
fixed concurrency, the same request count), then reports output throughput and median
TTFT/TPOT per peer and the ratio. guidellm installs on first use into bench/.peers/guidellm
(its own venv, torch pinned to the CPU wheel).

    .venv/bin/python bench/guidellm_check.py --concurrency 1 32 --num-requests 8 64 [--isa avx2]

Writes bench/results/<date>-guidellm-<isa>.{csv,md}.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "server"))

import run_peers  # noqa: E402

GUIDELLM = ["guidellm==0.8.1", "torch==2.13.0"]  # torch pinned: an open range pulls CUDA


def guidellm_exe() -> Path:
    return run_peers.venv("guidellm", GUIDELLM) / "bin" / "guidellm"


def tokenizer_dir(workdir: Path) -> str:
    """The GGUF's tokenizer as a Hugging Face folder: guidellm sizes its synthetic prompts
    with it."""
    from radixserve.models.loader import load_tokenizer, resolve_model

    path = workdir / "tokenizer"
    load_tokenizer(resolve_model(run_peers.model_gguf())).save_pretrained(path)
    return str(path)


def run_guidellm(
    exe: Path,
    port: int,
    model: str,
    tok: str,
    conc: int,
    n: int,
    prompt: int,
    output: int,
    out: Path,
) -> dict:
    cmd = [
        str(exe), "run",
        "--backend", f"kind=openai_http,target=http://127.0.0.1:{port},model={model}",
        "--profile", f"kind=concurrent,streams={conc}",
        "--constraint", f"kind=max_requests,count={n}",
        "--tokenizer", f"kind=huggingface_auto,model={tok}",
        "--data", f"kind=synthetic_text,prompt_tokens={prompt},output_tokens={output}",
        "--output", f"kind=json,path={out}",
        "--disable-progress",
    ]  # fmt: skip
    run_peers.sh(cmd, stdout=subprocess.DEVNULL)
    bench = json.loads(out.read_text())["benchmarks"][0]
    m = bench["metrics"]
    done = m["output_token_count"]["successful"]
    return {
        "requests": done["count"],
        "output_tok_s": done["total_sum"] / bench["duration"],
        "ttft_ms_p50": m["time_to_first_token_ms"]["successful"]["median"],
        "tpot_ms_p50": m["time_per_output_token_ms"]["successful"]["median"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--num-requests", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--isa", choices=list(run_peers.ISA_ENV), default="native")
    ap.add_argument("--peers", nargs="+", default=["radixserve", "llama.cpp"])
    a = ap.parse_args()
    run_peers.ISA[0] = a.isa
    threads = run_peers.cores()
    exe = guidellm_exe()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = tokenizer_dir(work)
        for name in a.peers:
            port = run_peers.free_port()
            peer = run_peers.SETUPS[name](port, max(a.concurrency), threads)
            if peer.skipped:
                print(f"!!! {name} skipped: {peer.skipped}")
                continue
            env = os.environ | run_peers.ISA_ENV[a.isa]
            log = open(work / f"{name}.log", "w")  # noqa: SIM115 - closed below
            proc = subprocess.Popen(peer.command, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                why = run_peers.wait_healthy(proc, port, timeout=600)
                if why:
                    print(f"!!! {name}: {why}")
                    continue
                path = run_peers.radixserve_cpu_path(port) if name.startswith("radixserve") else ""
                for conc, n in zip(a.concurrency, a.num_requests, strict=True):
                    load = run_peers.loadavg()
                    got = run_guidellm(
                        exe, port, "SmolLM2-135M-Instruct", tok, conc, n,
                        a.prompt_tokens, a.output_tokens, work / f"{name}-{conc}.json",
                    )  # fmt: skip
                    rows.append({"peer": name, "concurrency": conc, **got, "load": load,
                                 "path": path})  # fmt: skip
                    print(rows[-1], flush=True)
            finally:
                run_peers.stop(proc)
                log.close()
    write(rows, a)
    return 0


def write(rows: list[dict], a: argparse.Namespace) -> None:
    stamp = datetime.date.today().isoformat()
    stem = HERE / "results" / f"{stamp}-guidellm-{a.isa}"
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    by = {(r["peer"], r["concurrency"]): r for r in rows}
    lines = [
        f"# guidellm cross-check, {stamp}",
        "",
        f"CPU: {run_peers.cpu_model()} x{run_peers.cores()} (flags: {run_peers.cpu_flags()}), "
        f"instruction set {a.isa}; guidellm {GUIDELLM[0].split('==')[1]}, synthetic text "
        f"{a.prompt_tokens} prompt / {a.output_tokens} output tokens, chat completions.",
        "",
        "| concurrency | peer | requests | output tok/s | TTFT p50 ms | TPOT p50 ms | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['peer']} | {r['requests']} | {r['output_tok_s']:.1f} "
            f"| {r['ttft_ms_p50']:.0f} | {r['tpot_ms_p50']:.1f} | {r['load']} |"
        )
    lines += ["", "radixserve / llama.cpp:", ""]
    for conc in a.concurrency:
        rs, lc = by.get(("radixserve", conc)), by.get(("llama.cpp", conc))
        if rs and lc:
            lines.append(
                f"- concurrency {conc}: output throughput {rs['output_tok_s'] / lc['output_tok_s']:.2f}x, "
                f"median TTFT {rs['ttft_ms_p50'] / lc['ttft_ms_p50']:.2f}x"
            )
    paths = {r["path"] for r in rows if r["path"]}
    lines += ["", *(f"radixserve's CPU path: {p}" for p in paths)]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem}.csv and {stem}.md")


if __name__ == "__main__":
    sys.exit(main())
