"""Multi-LoRA throughput (issue 15's figure): the default model served alone, then with N
adapters (1, 4, 16) and the requests spread evenly over them, at concurrency 32.

    .venv/bin/python bench/lora.py [--adapters 1 4 16] [--num-prompts 96] [--rank 16]
        [--input-len 128] [--output-len 64] [--merged] [--out bench/results/lora-DATE]

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
import platform
import subprocess
import sys
import tempfile
import time
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
from radixserve.models.loader import (  # noqa: E402
    default_model_path,
    load_config,
    load_tokenizer,
    resolve_model,
)


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


def serve(flags: list[str], port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "radixserve.cli", "serve", "--port", str(port), *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "server")}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
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
    raise RuntimeError("server did not become healthy")


def measure(name: str, flags: list[str], requests, tokenizer, port: int, out: Path) -> dict:
    log = Path(tempfile.gettempdir()) / f"radixserve-lora-bench-{name.replace(' ', '-')}.log"
    proc = serve(flags, port, log)
    try:
        url = f"http://127.0.0.1:{port}"
        metrics, _ = asyncio.run(
            run_benchmark(
                backend="openai",
                base_url=url,
                requests=requests,
                count_tokens=lambda t: len(tokenizer.encode(t, add_special_tokens=False)),
                max_concurrency=32,
                warmup=requests[:4],
                progress=False,
            )
        )
        info = httpx.get(url + "/server_info").json()
    finally:
        proc.terminate()
        proc.wait(60)
    return {
        "config": name,
        "completed": metrics.completed,
        "failed": metrics.failed,
        "output_throughput": round(metrics.output_throughput, 1),
        "ttft_p50_ms": round(metrics.ttft_ms.median, 1),
        "tpot_p50_ms": round(metrics.tpot_ms.median, 1),
        "dtype": info["engine"]["dtype"],
        "quantization": info["engine"]["quantization"],
        "cpu_class": (info["engine"]["cpu_path"] or {}).get("cpu_class"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--num-prompts", type=int, default=96)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--port", type=int, default=30123)
    p.add_argument("--merged", action="store_true", help="also adapter a0 merged, own process")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / f"lora-{date.today()}"))
    args = p.parse_args()
    source = resolve_model(default_model_path())
    config, tokenizer = load_config(source), load_tokenizer(source, None)
    requests = sample_random(
        args.num_prompts, tokenizer, input_len=args.input_len, output_len=args.output_len
    )
    out = Path(args.out)
    rows = [measure("base", [], requests, tokenizer, args.port, out)]
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.adapters:
            names = [f"a{i}" for i in range(n)]
            for i, name in enumerate(names):
                if not Path(tmp, name).exists():
                    write_adapter(Path(tmp, name), config, args.rank, seed=i)
            spread = [replace(r, model=names[i % n]) for i, r in enumerate(requests)]
            flags = [
                "--lora-paths",
                *(f"{name}={tmp}/{name}" for name in names),
                "--max-loras",
                str(max(n, 1)),
                "--max-lora-rank",
                str(args.rank),
            ]
            rows.append(measure(f"{n} adapters", flags, spread, tokenizer, args.port, out))
        if args.merged:
            if not Path(tmp, "a0").exists():
                write_adapter(Path(tmp, "a0"), config, args.rank, seed=0)
            write_merged(Path(tmp, "merged"), Path(tmp, "a0"), source)
            flags = ["--model", f"{tmp}/merged"]
            rows.append(
                measure("a0 merged, own process", flags, requests, tokenizer, args.port, out)
            )
    base = rows[0]["output_throughput"]
    for row in rows:
        row["vs_base"] = round(row["output_throughput"] / base, 3)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"# Multi-LoRA throughput, {date.today()}",
        "",
        f"CPU: {platform.processor() or platform.machine()}, cpu class {rows[0]['cpu_class']}, "
        f"{os.cpu_count()} cores; load average at the end {os.getloadavg()[0]:.1f}.",
        f"Workload: {args.num_prompts} random prompts of {args.input_len} tokens, "
        f"{args.output_len} output tokens, concurrency 32, adapters of rank {args.rank} on all "
        "seven projections, requests spread round-robin over the adapters.",
        "",
        "| config | output tok/s | vs base | TTFT p50 ms | TPOT p50 ms | dtype | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['output_throughput']} | {r['vs_base']} | {r['ttft_p50_ms']} "
            f"| {r['tpot_p50_ms']} | {r['dtype']}+{r['quantization']} | {r['failed']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
