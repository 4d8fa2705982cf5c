"""Next-token agreement with float32 of each lossy path, and of llama.cpp's llama-server on
the same GGUF, teacher-forced over ShareGPT text (radixserve.bench.quality).

    .venv/bin/python bench/quality.py [--tokens 2000] [--llama-server PATH]

Prints one line per path and writes bench/results/quality-<date>.md. llama-server is the
one `make bench` builds into bench/.peers/llamacpp (pass its path, or leave it out).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "server"))

from radixserve.bench.quality import agreement, llama_top1, runner_top1, sharegpt_segments  # noqa: E402
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
    a = ap.parse_args()
    exact = ModelRunner(ServerArgs(device="cpu", dtype="float32", quantization="none",
                                   max_total_tokens=4096))  # fmt: skip
    tok = load_tokenizer(exact.source)
    segments = sharegpt_segments(tok, a.tokens)
    reference = runner_top1(exact, segments)
    n = sum(len(r) for r in reference)
    del exact
    rows = []
    paths = [("int8 (float32 + fbgemm int8)", "float32", "int8")]
    if cpu_path.bf16_native():
        paths += [
            ("int4 (bfloat16 + int4 decode)", "bfloat16", "int4"),
            ("bfloat16", "bfloat16", "none"),
        ]
    for name, dtype, quant in paths:
        runner = ModelRunner(ServerArgs(device="cpu", dtype=dtype, quantization=quant,
                                        max_total_tokens=4096))  # fmt: skip
        rows.append((name, agreement(runner_top1(runner, segments), reference)))
        del runner
    if a.llama_server:
        proc = start_llama(a.llama_server, a.port)
        try:
            got = llama_top1(f"http://127.0.0.1:{a.port}", segments)
        finally:
            proc.terminate()
            proc.wait()
        rows.append(
            ("llama.cpp llama-server (Q4_1 weights, Q8 activations)", agreement(got, reference))
        )
    klass, cap = cpu_path.cpu_class()
    lines = [
        f"# Next-token agreement with float32, {datetime.date.today()}",
        "",
        f"CPU: {platform.processor() or platform.machine()}, class {klass} (torch {cap}); "
        f"{n} teacher-forced positions over {len(segments)} ShareGPT segments.",
        "",
        "| path | top-1 agreement |",
        "|---|---|",
        *[f"| {name} | {100 * v:.2f}% |" for name, v in rows],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "bench" / "results" / f"quality-{datetime.date.today()}.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
