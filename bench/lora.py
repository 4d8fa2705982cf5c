"""Multi-LoRA throughput (issue 15's figure): a model (the default one unless --model) served
alone, then with N adapters (1, 4, 16) and the requests spread evenly over them, at
concurrency 32.

    .venv/bin/python bench/lora.py [--adapters 1 4 16] [--num-prompts 96] [--rank 16]
        [--input-len 128] [--output-len 64] [--merged] [--out bench/results/lora-DATE]
        [--model PATH --tokenizer PATH] [--server-args "--dtype float16 ..."]

bench/gpu/run_gpu_bench.py's `lora` phase runs this on a GPU on a Llama-3-8B-shaped model
(--model, --server-args, --log-dir, --max-duration, --start-timeout are for such runs).

The adapters are random (non-zero A and B, every target module, rank --rank) in PEFT's
format, written here with safetensors, so the run needs no network (nor PEFT, without
--merged). Each configuration gets its own server (started, warmed up, measured,
stopped); the same random-token prompts go to each. Output throughput is the server's
generated tokens per second of wall time. `--merged` adds issue 15's other comparison:
adapter a0 merged into the base weights with PEFT's merge_and_unload, saved as a Hugging
Face folder (bfloat16 safetensors) and served by its own radixserve process with --model,
the same requests at the same concurrency, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import date
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "server"))

from radixserve.bench.datasets import sample_random  # noqa: E402
from radixserve.bench.lora_adapters import write_random_adapter  # noqa: E402
from radixserve.bench.serving import run_benchmark  # noqa: E402
from radixserve.engine.cpu_path import cpu_class  # noqa: E402
from radixserve.models.loader import (  # noqa: E402
    default_model_path,
    load_config,
    load_tokenizer,
    resolve_model,
)
from run_peers import cpu_model  # noqa: E402


def write_adapter(folder: Path, config, rank: int, seed: int) -> None:
    """A PEFT LoRA adapter of `rank` on every projection of every layer, random weights."""
    write_random_adapter(folder, config, rank, seed)


def write_merged(folder: Path, adapter: Path, source) -> None:
    """The base model with `adapter` merged into its weights, as a transformers folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        source.folder, gguf_file=source.gguf_file, dtype=torch.float32
    )
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    # loaded from a GGUF, transformers marks the model quantized and refuses to save it;
    # its weights are plain float tensors by now
    merged.hf_quantizer = None
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    merged.to(torch.bfloat16).save_pretrained(folder)
    load_tokenizer(source, None).save_pretrained(folder)


def write_adapters(folder: Path, names: list[str], config, rank: int) -> None:
    """The adapters not yet in `folder`, written side by side (seconds each for an 8B)."""
    todo = [(i, n) for i, n in enumerate(names) if not Path(folder, n).exists()]
    with ThreadPoolExecutor(max(1, min(len(todo), os.cpu_count() or 1))) as pool:
        list(pool.map(lambda job: write_adapter(Path(folder, job[1]), config, rank, job[0]), todo))


def serve(flags: list[str], port: int, log: Path, start_timeout: float = 600) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "radixserve.cli", "serve", "--port", str(port), *flags]
    # the server's package first, then whatever the caller's path holds (on the GPU
    # machine: the carried wheels)
    path = os.pathsep.join(p for p in (str(ROOT / "server"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    print("+ " + shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not become healthy in {start_timeout:.0f} s")


def measure(name: str, flags: list[str], requests, tokenizer, args, warm: int = 4) -> dict:
    """One server with `flags` (plus --server-args), started, warmed up with the first
    `warm` requests (one per adapter, so no adapter is first copied into its slot during
    the measured run), measured at --concurrency, stopped; its log goes to --log-dir."""
    log = Path(args.log_dir) / f"radixserve-lora-bench-{name.replace(' ', '-')}.log"
    flags = [*flags, *shlex.split(args.server_args)]
    started = time.monotonic()
    proc = serve(flags, args.port, log, args.start_timeout)
    ready_s = time.monotonic() - started
    try:
        url = f"http://127.0.0.1:{args.port}"
        metrics, _ = asyncio.run(
            run_benchmark(
                backend="openai",
                base_url=url,
                requests=requests,
                count_tokens=lambda t: len(tokenizer.encode(t, add_special_tokens=False)),
                max_concurrency=args.concurrency,
                warmup=requests[:warm],
                progress=False,
                max_duration=args.max_duration,
            )
        )
        info = httpx.get(url + "/server_info").json()
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    engine = info["engine"]
    return {
        "config": name,
        "completed": metrics.completed,
        "failed": metrics.failed,
        "output_throughput": round(metrics.output_throughput, 1),
        "ttft_p50_ms": round(metrics.ttft_ms.median, 1),
        "tpot_p50_ms": round(metrics.tpot_ms.median, 1),
        "dtype": engine["dtype"],
        "quantization": engine["quantization"],
        "device": engine["device"],
        "attention": engine["attention_backend"],
        "cpu_class": (engine["cpu_path"] or {}).get("cpu_class"),
        "ready_s": round(ready_s, 1),
    }


def machine(rows: list[dict]) -> str:
    """The line naming what ran: the GPU on CUDA, the CPU and its class otherwise."""
    if rows[0]["device"].startswith("cuda"):
        # from nvidia-smi: torch.cuda here would hold a context on the GPU the next
        # server sizes its KV cache on
        smi = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
        try:
            name = subprocess.run(smi, capture_output=True, text=True).stdout.strip()
        except OSError:
            name = "?"
        return (
            f"GPU: {name.splitlines()[0] if name else '?'}, torch {torch.__version__}; "
            f"host CPU: {cpu_model()}, cpu class {cpu_class()[0]}, {os.cpu_count()} cores."
        )
    return (
        f"CPU: {cpu_model()}, cpu class {rows[0]['cpu_class']}, "
        f"{os.cpu_count()} cores; load average at the end {os.getloadavg()[0]:.1f}."
    )


def plot(rows: list[dict], png: Path) -> bool:
    """Output tok/s per configuration; False where matplotlib is missing (the GPU image)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = [r["config"] for r in rows]
    bars = ax.bar(names, [r["output_throughput"] for r in rows], color="#4c72b0")
    ax.bar_label(bars, labels=[f"{r['vs_base']:.2f}x" if r["vs_base"] else "" for r in rows])
    ax.set_ylabel("output tok/s")
    ax.set_title("multi-LoRA throughput, concurrency " + str(rows[0].get("concurrency", "")))
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--num-prompts", type=int, default=96)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--port", type=int, default=30123)
    p.add_argument("--merged", action="store_true", help="also adapter a0 merged, own process")
    p.add_argument("--model", default=None, help="the served model (default: the default one)")
    p.add_argument("--tokenizer", default=None, help="its tokenizer, if not beside it")
    p.add_argument("--server-args", default="", help="more flags for every server, one string")
    p.add_argument("--max-duration", type=float, default=None, help="seconds per measured run")
    p.add_argument("--start-timeout", type=float, default=600, help="seconds to healthy")
    p.add_argument("--log-dir", default=tempfile.gettempdir(), help="the servers' logs")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / f"lora-{date.today()}"))
    args = p.parse_args()
    source = resolve_model(args.model or default_model_path())
    config, tokenizer = load_config(source), load_tokenizer(source, args.tokenizer)
    requests = sample_random(
        args.num_prompts, tokenizer, input_len=args.input_len, output_len=args.output_len
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    model = ["--model", source.path] if args.model else []
    model += ["--tokenizer-path", args.tokenizer] if args.tokenizer else []
    rows: list[dict] = []
    errors: list[str] = []

    def run(name: str, flags: list[str], reqs, warm: int = 4) -> None:
        """Measure one configuration and rewrite the report, so that a run cut off later
        (the GPU call's budget) keeps what finished; a server that fails is reported."""
        try:
            rows.append(measure(name, flags, reqs, tokenizer, args, warm))
        except Exception as e:  # a server that did not start or died: the others still run
            errors.append(f"{name}: {type(e).__name__}: {str(e)[-1500:]}")
            print(f"{name} failed: {e}", flush=True)
        if rows:
            report(rows, errors, args, source, out)

    with tempfile.TemporaryDirectory() as tmp:
        # written first: on a big model they take seconds each, which must not overlap a
        # measured run
        count = max([*args.adapters, 1 if args.merged else 0])
        write_adapters(Path(tmp), [f"a{i}" for i in range(count)], config, args.rank)
        run("base", model, requests)
        for n in args.adapters:
            names = [f"a{i}" for i in range(n)]
            spread = [replace(r, model=names[i % n]) for i, r in enumerate(requests)]
            flags = [
                *model,
                "--lora-paths",
                *(f"{name}={tmp}/{name}" for name in names),
                "--max-loras",
                str(max(n, 1)),
                "--max-lora-rank",
                str(args.rank),
            ]
            run(f"{n} adapters", flags, spread, warm=max(4, n))
        if args.merged:
            write_merged(Path(tmp, "merged"), Path(tmp, "a0"), source)
            run("a0 merged, own process", ["--model", f"{tmp}/merged"], requests)
    if rows:
        print(out.with_suffix(".md").read_text())
    if errors or not rows:
        raise SystemExit("failed: " + "; ".join(errors))


def report(rows: list[dict], errors: list[str], args, source, out: Path) -> None:
    """The CSV, the md table (and a PNG where matplotlib is installed) of `rows` so far."""
    base = rows[0]["output_throughput"] if rows[0]["config"] == "base" else None
    for row in rows:
        row["vs_base"] = round(row["output_throughput"] / base, 3) if base else None
        row["concurrency"] = args.concurrency
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"# Multi-LoRA throughput, {date.today()}",
        "",
        machine(rows),
        f"Model: {source.path}. Workload: {args.num_prompts} random prompts of "
        f"{args.input_len} tokens, {args.output_len} output tokens (EOS ignored), concurrency "
        f"{args.concurrency}, adapters of rank {args.rank} on all seven projections, requests "
        "spread round-robin over the adapters. Server flags: "
        f"`{args.server_args or '(defaults)'}`.",
        "",
        "| config | output tok/s | vs base | TTFT p50 ms | TPOT p50 ms | dtype | attention "
        "| completed | failed | ready s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['output_throughput']} | {r['vs_base']} | {r['ttft_p50_ms']} "
            f"| {r['tpot_p50_ms']} | {r['dtype']}+{r['quantization']} | {r['attention']} "
            f"| {r['completed']} | {r['failed']} | {r['ready_s']} |"
        )
    for e in errors:  # the server's last log lines, as they came
        name, _, why = e.partition(": ")
        lines += ["", f"Failed: {name}", "", "```", why.strip(), "```"]
    if plot(rows, out.with_suffix(".png")):
        lines += ["", f"![output throughput]({out.with_suffix('.png').name})"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
