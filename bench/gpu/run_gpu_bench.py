"""One call on a GPU machine: the `gpu` tests, the expert layer's grouped GEMM against its
loop (moe_grouped.py, seconds), then ShareGPT against our server on a
random-weight model of Llama-3-8B's shape; figures and logs go to $OUT (what the device tool
brings back) or, without it, bench/results/gpu-<date>/.

First, where there is network: `.venv/bin/python bench/gpu/prepare.py` (fills .gpu/). Then
on the GPU machine, with .gpu carried (the device tool: carry=[".gpu"], timeout_s=600):

    python3 bench/gpu/run_gpu_bench.py                # install, gpu tests, benchmark
    python3 bench/gpu/run_gpu_bench.py tests,moe      # or some phases (install always runs)
    python3 bench/gpu/run_gpu_bench.py tests-lora,lora --budget-s 330   # multi-LoRA only

Phases: `tests` (every `gpu` test), `tests-lora` (only tests/server/test_lora_gpu.py),
`moe`, `bench` (ShareGPT at concurrency 1, 32, 128), `lora` (bench/lora.py on the same
model: served alone, then with 16 random rank-16 adapters on all seven projections; 200
random prompts of 128 tokens, 64 output tokens, concurrency 32, requests spread evenly over
the adapters; ~3 minutes, most of it the two servers' starts). `lora` is not a default
phase: with the others it would not fit one call.

Phases stop at --budget-s (default 560 s) so that what finished still comes back: the tests
need FlashInfer's first JIT build (one prefill and one decode module for float16 and head
size 128, compiled with every core; minutes), the benchmark about 4 minutes (writing and
loading 15 GB of random weights, CUDA-graph capture, then one run per concurrency). The
JIT cache lives in .gpu/, so on a machine that stays warm a second call skips the build.

The model: Llama-3-8B's layers exactly (32 x 4096, 32 heads / 8 KV heads of 128, MLP 14336)
with random float16 weights, and the default model's tokenizer, so the vocabulary is that
tokenizer's 49152 instead of 128256 (the LM head is 0.2 of 8 billion parameters, not 0.5).
Every request ignores EOS, so random weights make the same work as real ones. The peers
(SGLang, vLLM) are not run: their wheels and kernels are far beyond what a call carries.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
import urllib.request
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from run_peers import COLUMNS, cpu_model, fmt, free_port, load_records, write_csv  # noqa: E402

GPU_DIR = ROOT / ".gpu"
SITE = GPU_DIR / "site"
TOKENIZER = GPU_DIR / "tokenizer"
MODEL = GPU_DIR / "llama3-8b-shape-random"
LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# concurrency -> prompts; ShareGPT replies capped at 256 tokens, as in the CPU benchmark
RUNS = {1: 16, 32: 200, 128: 200}
BENCH_MIN_S = 240  # model write + load + graph capture + one run
# model write (~27 s), 16 adapters (~15 s), two server starts (~50 s each, more if
# FlashInfer's kernels are not built yet), two runs (seconds; the LoRA one eager)
LORA_MIN_S = 200
LORA_ADAPTERS = 16
GPU_TESTS = [
    "tests/server/test_gpu_paths.py",
    "tests/server/test_moe_layer.py",
    "tests/server/test_lora_gpu.py",
]
START = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {msg}", flush=True)


def left(budget: float) -> float:
    return budget - (time.monotonic() - START)


def sh(cmd: list[str], out: Path | None = None, timeout: float | None = None, env=None) -> int:
    """Run, echoing the command; output to the console or appended to `out`. Returns the
    exit code (124 when cut off at `timeout`)."""
    log("+ " + shlex.join(cmd))
    try:
        if out is None:
            return subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout).returncode
        with out.open("a") as f:
            return subprocess.run(
                cmd, cwd=ROOT, env=env, timeout=timeout, stdout=f, stderr=subprocess.STDOUT
            ).returncode
    except subprocess.TimeoutExpired:
        log(f"cut off after {timeout:.0f} s")
        return 124


def install() -> None:
    """FlashInfer and the server's missing packages into .gpu/site (kept while the machine
    stays warm, so a second call skips this)."""
    done = SITE / ".installed"
    if done.exists():
        log("packages already installed in .gpu/site")
        return
    missing = [p for p in (GPU_DIR / "flashinfer.tar.xz", GPU_DIR / "wheels") if not p.exists()]
    if missing:
        raise SystemExit(f"{missing[0]} is missing: run bench/gpu/prepare.py and carry .gpu")
    SITE.mkdir(parents=True, exist_ok=True)
    log("unpacking flashinfer")
    with tarfile.open(GPU_DIR / "flashinfer.tar.xz") as tf:
        tf.extractall(SITE, filter="data")
    wheels = sorted(str(w) for w in (GPU_DIR / "wheels").glob("*.whl"))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    pip += ["--no-compile", "--upgrade", "--target", str(SITE), *wheels]
    if sh(pip) != 0:
        raise SystemExit("pip install of the carried wheels failed")
    done.touch()


def environment() -> dict[str, str]:
    cap = subprocess.run(
        ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    ).stdout.split()
    arch = cap[0] if cap else "9.0"
    return os.environ | {
        "PYTHONPATH": os.pathsep.join([str(ROOT / "server"), str(SITE)]),
        "PYTHONUNBUFFERED": "1",
        "FLASHINFER_WORKSPACE_BASE": str(GPU_DIR),  # the JIT cache
        "FLASHINFER_CUDA_ARCH_LIST": arch + ("a" if arch == "9.0" else ""),  # sm_90a on Hopper
        "MAX_JOBS": str(os.cpu_count() or 8),
        "RADIXSERVE_TEST_TOKENIZER": str(TOKENIZER),
    }


def versions(env) -> dict[str, str]:
    code = (
        "import json, torch, flashinfer; print(json.dumps({'gpu': torch.cuda.get_device_name(), "
        "'torch': torch.__version__, 'cuda': torch.version.cuda, "
        "'flashinfer': flashinfer.__version__}))"
    )
    got = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT
    )
    if got.returncode != 0:
        raise SystemExit(f"torch/flashinfer do not import:\n{got.stderr}")
    info = json.loads(got.stdout.strip().splitlines()[-1])
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    info["driver, memory"] = smi
    klass = subprocess.run(
        [sys.executable, "-c", "from radixserve.engine.cpu_path import cpu_class; print(cpu_class()[0])"],
        env=env, capture_output=True, text=True, cwd=ROOT,
    ).stdout.strip() or "?"  # fmt: skip
    info["host cpu"] = f"{cpu_model()}, cpu class {klass}, {os.cpu_count()} cores"
    return info


def run_tests(
    env, out_dir: Path, budget: float, reserve: float, files: list[str], name: str = "gpu-tests"
) -> str:
    log_path = out_dir / f"{name}.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider"]
    rc = sh(cmd + files, out=log_path, timeout=max(left(budget) - reserve, 30), env=env)
    tail = log_path.read_text().strip().splitlines()[-1:] if log_path.exists() else []
    summary = f"exit {rc}: {tail[0] if tail else 'no output'} ({name}.log)"
    log(f"{' '.join(files)}: {summary}")
    return summary


def write_random_model(folder: Path) -> None:
    """Llama-3-8B-shaped safetensors of N(0, 0.02) float16 weights (norms 1), one file per
    layer; the vocabulary is the carried tokenizer's."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    vocab = len(AutoTokenizer.from_pretrained(TOKENIZER))
    cfg = LlamaConfig(vocab_size=vocab, **LLAMA3_8B)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        w = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float16)
        return w.mul_(0.02).cpu()

    h, inter = cfg.hidden_size, cfg.intermediate_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    ones = torch.ones(h, dtype=torch.float16)
    outer = {
        "model.embed_tokens.weight": rand(vocab, h),
        "model.norm.weight": ones,
        "lm_head.weight": rand(vocab, h),
    }
    save_file(outer, folder / "model-00000.safetensors")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        layer = {
            p + "self_attn.q_proj.weight": rand(q, h),
            p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h),
            p + "self_attn.o_proj.weight": rand(h, q),
            p + "mlp.gate_proj.weight": rand(inter, h),
            p + "mlp.up_proj.weight": rand(inter, h),
            p + "mlp.down_proj.weight": rand(h, inter),
            p + "input_layernorm.weight": ones.clone(),
            p + "post_attention_layernorm.weight": ones.clone(),
        }
        save_file(layer, folder / f"model-{i + 1:05d}.safetensors")


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1)
    return False


def ensure_model(env) -> bool:
    """The random-weight model in .gpu/ (kept while the machine stays warm)."""
    if (MODEL / "config.json").exists():
        return True
    log("writing the random-weight model")
    return sh([sys.executable, __file__, "random-model"], env=env) == 0


def run_lora(env, out_dir: Path, stem: str, budget: float, commands: list[str]) -> list[str]:
    """bench/lora.py on the random 8B-shaped model: the base alone, then 16 adapters."""
    if not ensure_model(env):
        return ["lora: writing the random-weight model failed"]
    cmd = [
        sys.executable, "bench/lora.py",
        "--model", str(MODEL), "--tokenizer", str(TOKENIZER),
        "--adapters", str(LORA_ADAPTERS), "--rank", "16",
        "--num-prompts", "200", "--input-len", "128", "--output-len", "64",
        "--concurrency", "32", "--port", str(free_port()),
        # the run never exceeds 32 rows a step: capture no larger graphs; the first start
        # may include FlashInfer's JIT build when `tests-lora` did not run before
        "--server-args=--dtype float16 --cuda-graph-max-bs 32",
        "--max-duration", "60", "--start-timeout", "240",
        "--log-dir", str(out_dir), "--out", str(out_dir / f"{stem}-lora"),
    ]  # fmt: skip
    commands.append(shlex.join(cmd))
    rc = sh(cmd, timeout=max(left(budget) - 5, 30), env=env)
    return [f"lora (bench/lora.py): exit {rc}; see {stem}-lora.md and the server logs"]


def run_bench(env, out_dir: Path, stem: str, budget: float, commands: list[str]) -> list[str]:
    notes: list[str] = []
    if not ensure_model(env):
        return ["writing the random-weight model failed"]
    port = free_port()
    server = [sys.executable, "-m", "radixserve.cli", "serve", "--model", str(MODEL)]
    server += ["--tokenizer-path", str(TOKENIZER), "--dtype", "float16"]
    server += ["--host", "127.0.0.1", "--port", str(port)]
    commands.append("server: " + shlex.join(server))
    log("+ " + shlex.join(server))
    with (out_dir / "server.log").open("w") as slog:
        proc = subprocess.Popen(server, cwd=ROOT, env=env, stdout=slog, stderr=subprocess.STDOUT)
        try:
            started = time.monotonic()
            if not wait_healthy(proc, port, timeout=max(left(budget) - 60, 30)):
                return [f"server not healthy (exit {proc.poll()}); see server.log"]
            notes.append(f"server ready in {time.monotonic() - started:.0f} s")
            jsonl = out_dir / f"{stem}.jsonl"
            for conc, prompts in RUNS.items():
                if left(budget) < 45:
                    notes.append(f"concurrency {conc}: skipped, out of time")
                    continue
                cmd = [
                    sys.executable, "-m", "radixserve.bench",
                    "--backend", "radixserve", "--port", str(port),
                    "--tokenizer", str(TOKENIZER),
                    "--dataset-name", "sharegpt", "--dataset-path", str(GPU_DIR / "sharegpt.json"),
                    "--num-prompts", str(prompts), "--sharegpt-max-output-len", "256",
                    "--max-concurrency", str(conc), "--warmup-requests", str(min(conc, 4)),
                    "--seed", "1", "--disable-tqdm",
                    "--max-duration", str(int(min(90, left(budget) - 30))),
                    "--tag", json.dumps({"peer": "radixserve", "workload": "sharegpt"}),
                    "--output-file", str(jsonl),
                ]  # fmt: skip
                commands.append(shlex.join(cmd))
                rc = sh(cmd, timeout=max(left(budget) - 10, 20), env=env)
                if rc != 0:
                    notes.append(f"concurrency {conc}: `radixserve bench` exited {rc}")
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return notes


def write_report(out_dir: Path, stem: str, info: dict, tests: list[str], notes, commands) -> None:
    jsonl = out_dir / f"{stem}.jsonl"
    records = load_records(jsonl) if jsonl.exists() else []
    if records:
        write_csv(records, out_dir / f"{stem}.csv")
    lines = [f"# GPU run, {date.today().isoformat()}", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [f"- gpu tests (pytest -m gpu): {t}" for t in tests or ["not run"]]
    lines += [
        "- model: Llama-3-8B's layers with random float16 weights and the default model's "
        "tokenizer (vocabulary 49152); every request ignores EOS",
        "- server: float16, FlashInfer attention, decode CUDA graphs up to batch 64 (larger "
        "decode batches run eagerly), KV cache from --mem-fraction-static 0.85",
        "- peers: SGLang and vLLM not run (their wheels cannot be carried to this machine)",
        "",
    ]
    lines += [f"- {n}" for n in notes]
    lora = out_dir / f"{stem}-lora.md"
    if lora.exists():  # the `lora` phase's report, under this one's title
        lines += ["", "#" + lora.read_text().strip()]
    if records:  # the `bench` phase's
        lines += ["", "| " + " | ".join(label for _, label in COLUMNS) + " |"]
        lines.append("|" + "---|" * len(COLUMNS))
        lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in COLUMNS) + " |" for r in records]
    lines += ["", "## Exact commands", "", "```", *commands, "```", ""]
    (out_dir / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description="gpu tests and the GPU benchmark, in one call")
    ap.add_argument(
        "phases", nargs="?", default="tests,moe,bench", help="tests, tests-lora, moe, bench, lora"
    )
    ap.add_argument("--budget-s", type=float, default=560.0)
    args = ap.parse_args()
    if args.phases == "random-model":
        write_random_model(MODEL)
        return 0
    phases = set(args.phases.split(","))
    unknown = phases - {"tests", "tests-lora", "moe", "bench", "lora"}
    if unknown:
        raise SystemExit(f"unknown phase(s) {sorted(unknown)}")
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "results" / f"gpu-{date.today()}")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{date.today().isoformat()}-gpu"
    install()
    env = environment()
    info = versions(env)
    log(f"versions: {info}")
    commands = [f"python3 bench/gpu/run_gpu_bench.py {args.phases}"]
    tests, notes = [], []
    # what the later phases need is kept back from the tests' time
    reserve = (BENCH_MIN_S if "bench" in phases else 0) + (LORA_MIN_S if "lora" in phases else 0)
    if "tests" in phases:
        tests.append(run_tests(env, out_dir, args.budget_s, reserve, GPU_TESTS))
    elif "tests-lora" in phases:
        files = ["tests/server/test_lora_gpu.py"]
        tests.append(run_tests(env, out_dir, args.budget_s, reserve, files, "gpu-tests-lora"))
    if "moe" in phases:  # seconds: the expert layer's grouped GEMM against its loop
        rc = sh([sys.executable, "bench/gpu/moe_grouped.py", "--out", str(out_dir)], env=env)
        notes.append(f"moe_grouped.py: exit {rc} (moe-grouped.md)")
    if "bench" in phases:
        if left(args.budget_s) < BENCH_MIN_S / 2:
            notes.append("benchmark skipped: out of time (run the `bench` phase alone)")
        else:
            notes += run_bench(env, out_dir, stem, args.budget_s, commands)
    if "lora" in phases:
        if left(args.budget_s) < LORA_MIN_S * 0.75:
            notes.append("lora skipped: out of time (run the `lora` phase alone)")
        else:
            notes += run_lora(env, out_dir, stem, args.budget_s, commands)
    write_report(out_dir, stem, info, tests, notes, commands)
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
