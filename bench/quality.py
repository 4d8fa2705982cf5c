"""Next-token agreement with float32 of each lossy path, and of llama.cpp's llama-server on
the same GGUF, teacher-forced over ShareGPT text (radixserve.bench.quality); and the greedy
answers of each path to a fixed prompt set, against float32's.

    .venv/bin/python bench/quality.py [--tokens 2000] [--llama-server PATH] [--isa avx2]

Prints one line per path and writes bench/results/quality-<date>-<class>.md. llama-server
is the one `make bench` builds into bench/.peers/llamacpp (or llamacpp-avx2); pass its path,
or `--llama-server auto` to take (and build on first use) the one for --isa. `--isa avx2`
re-executes this script with torch, oneDNN and MKL restricted to AVX2.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "server"))

from radixserve.bench.quality import (  # noqa: E402
    FIXED_PROMPTS,
    agreement,
    greedy_answers,
    llama_top1,
    runner_top1,
    runner_top1_decode,
    sharegpt_segments,
)
from radixserve.config import ServerArgs  # noqa: E402
from radixserve.engine import cpu_path  # noqa: E402
from radixserve.engine.model_runner import ModelRunner  # noqa: E402
from radixserve.models.loader import default_model_path, load_tokenizer  # noqa: E402


def start_llama(binary: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [binary, "-m", str(default_model_path()), "--host", "127.0.0.1", "--port", str(port),
         "-np", "1", "-c", "2048", "-t", "2", "--no-webui"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("llama-server did not become healthy")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--llama-server", default=None)
    ap.add_argument("--port", type=int, default=8093)
    ap.add_argument("--isa", choices=["native", "avx2", "avx512"], default="native")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    import run_peers

    env = run_peers.ISA_ENV[a.isa]
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], os.environ | env)
    if a.llama_server == "auto":
        a.llama_server, why = run_peers.llamacpp_binary(a.isa)
        if not a.llama_server:
            raise SystemExit(why)
    exact = ModelRunner(ServerArgs(device="cpu", dtype="float32", quantization="none",
                                   max_total_tokens=4096))  # fmt: skip
    tok = load_tokenizer(exact.source)
    segments = sharegpt_segments(tok, a.tokens)
    reference = runner_top1(exact, segments)
    n = sum(len(r) for r in reference)
    del exact
    rows = []
    # (name, dtype, quantization, mode): "decode" runs the segments as batch-8 decode steps,
    # the batch the small-batch kernels serve; "prefill" as one prefill each (dense path)
    paths = [("float32, decode steps (checks the decode mode: 100% expected)", "float32",
              "none", "decode")]  # fmt: skip
    if cpu_path.int4_available():
        paths.append(("float32 + int4 small batches, decode steps", "float32", "int4", "decode"))
    if cpu_path.bf16_native():
        paths += [
            ("bfloat16 + int4 small batches, decode steps", "bfloat16", "int4", "decode"),
            ("bfloat16, prefill (the dense path of large batches)", "bfloat16", "none",
             "prefill"),
        ]  # fmt: skip
    if cpu_path.int8_available():
        paths.append(("float32 + fbgemm int8 (every batch), prefill", "float32", "int8", "prefill"))
    for name, dtype, quant, mode in paths:
        runner = ModelRunner(ServerArgs(device="cpu", dtype=dtype, quantization=quant,
                                        max_total_tokens=4096))  # fmt: skip
        run = runner_top1_decode if mode == "decode" else runner_top1
        rows.append((name, agreement(run(runner, segments), reference)))
        print(f"{name}: {100 * rows[-1][1]:.2f}%", flush=True)
        del runner
    answers = {"float32 (exact)": greedy_answers(
        ServerArgs(device="cpu", dtype="float32", quantization="none", max_total_tokens=4096),
        FIXED_PROMPTS)}  # fmt: skip
    auto = ServerArgs(device="cpu", max_total_tokens=4096)
    answers["auto"] = greedy_answers(auto, FIXED_PROMPTS)
    if a.llama_server:
        proc = start_llama(a.llama_server, a.port)
        try:
            got = llama_top1(f"http://127.0.0.1:{a.port}", segments)
        finally:
            proc.terminate()
            proc.wait()
        rows.append(
            (
                f"llama.cpp llama-server, {a.isa} build (Q4_1 weights, Q8 activations)",
                agreement(got, reference),
            )
        )
    klass, cap = cpu_path.cpu_class()
    same = sum(x == y for x, y in zip(answers["auto"], answers["float32 (exact)"], strict=True))
    lines = [
        f"# Next-token agreement with float32, {datetime.date.today()}",
        "",
        f"CPU: {run_peers.cpu_model()} (flags: {run_peers.cpu_flags()}), class {klass} "
        f"(torch {cap}, instruction set {a.isa}); {n} teacher-forced positions over "
        f"{len(segments)} ShareGPT segments of 256 tokens. `auto` here: "
        f"{cpu_path.choose('auto', 'auto', True)[2].to_dict()}.",
        "",
        "| path | top-1 agreement |",
        "|---|---|",
        *[f"| {name} | {100 * v:.2f}% |" for name, v in rows],
        "",
        f"Greedy chat answers (32 tokens) to the fixed prompt set: `auto` equals float32 on "
        f"{same} of {len(FIXED_PROMPTS)}.",
        "",
        "| prompt | float32 | auto |",
        "|---|---|---|",
        *[f"| {p} | {e!r} | {g!r} |" for p, e, g in
          zip(FIXED_PROMPTS, answers["float32 (exact)"], answers["auto"], strict=True)],
    ]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "bench" / "results" / f"quality-{datetime.date.today()}-{klass}.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
