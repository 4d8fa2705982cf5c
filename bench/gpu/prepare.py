"""Gather, on a machine with network, what bench/gpu/run_gpu_bench.py needs on a GPU machine
that has none (the image has CUDA, PyTorch, transformers and pytest, and no flashinfer or
server packages). Everything lands in .gpu/ (git-ignored through .git/info/exclude), about
15 MB, to be carried to the GPU machine with the working tree:

- flashinfer.tar.xz: the files of the flashinfer-python wheel at the version pyproject's
  gpu extra pins (the one the server image installs), xz-compressed (0.6.13: a 14 MB
  wheel, under 6 MB packed; a device call carries 64 MiB in all);
- wheels/: what `import flashinfer` needs beyond the image (apache-tvm-ffi, in the range
  flashinfer-python's own metadata asks for) and the server's dependencies the image
  lacks, built for CPython 3.12 on x86-64 Linux;
- tokenizer/: the default model's tokenizer and chat template, for the benchmark's
  random-weight model and the benchmark client;
- sharegpt.json: the ShareGPT conversations the benchmark samples (not the 125 MB file).

flashinfer-cubin, pinned beside flashinfer-python in the gpu extra, is not carried: its
prebuilt kernels would not fit in a device call, and FlashInfer JIT-compiles the kernels
there (the image has nvcc). With no cubin installed there is none of another version for
flashinfer-python to refuse.

    .venv/bin/python bench/gpu/prepare.py      # here, ~3 minutes (the xz pass)
    python3 bench/gpu/run_gpu_bench.py         # there, with .gpu carried
"""

from __future__ import annotations

import argparse
import email.message
import email.parser
import importlib.metadata
import json
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
GPU_DIR = ROOT / ".gpu"
# flashinfer-python's requirements that `import flashinfer` needs and the GPU image lacks
# (its others there are on the image or optional); carried in the range it asks for
FLASHINFER_IMPORT_NEEDS = {"apache-tvm-ffi"}
# the server's imports that the GPU image lacks, with what they need in turn
SERVER_PACKAGES = ["pyzmq", "fastapi", "uvicorn"]
# on the GPU image already (see the device notes' package list): not carried
ON_IMAGE = {
    "aiohttp", "certifi", "click", "h11", "httpcore", "httpx", "idna", "jinja2",
    "markupsafe", "numpy", "prometheus-client", "pyyaml", "safetensors", "tokenizers",
    "torch", "tqdm", "transformers", "uvloop",
}  # fmt: skip
SHAREGPT_PROMPTS = 200
CARRY_LIMIT = 64 * 1024 * 1024


def pip_download(specs: list[str], dest: Path) -> None:
    """Wheels for the GPU image's Python (3.12, x86-64 manylinux), without dependencies."""
    platforms = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)]
    platforms += ["manylinux2014_x86_64", "manylinux1_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
    for p in platforms:
        cmd += ["--platform", p]
    subprocess.run(cmd + specs, check=True)


def norm(name: str) -> str:
    return name.lower().replace("_", "-")


def flashinfer_pin() -> Requirement:
    """flashinfer-python's requirement from pyproject's gpu extra, as the server image
    installs it, so the benchmark measures the same version."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in project["optional-dependencies"]["gpu"]:
        if norm(Requirement(line).name) == "flashinfer-python":
            return Requirement(line)
    raise SystemExit("pyproject.toml's gpu extra does not pin flashinfer-python")


def packed_metadata(packed: Path) -> email.message.Message:
    """The METADATA of the wheel packed in `packed`."""
    with tarfile.open(packed) as tf:
        (name,) = [n for n in tf.getnames() if n.endswith(".dist-info/METADATA")]
        return email.parser.BytesParser().parse(tf.extractfile(name))


def flashinfer_needs(metadata: email.message.Message) -> list[str]:
    """The FLASHINFER_IMPORT_NEEDS requirements as flashinfer-python's METADATA states them."""
    needs = [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]
    return [
        f"{req.name}{req.specifier}"
        for req in needs
        if norm(req.name) in FLASHINFER_IMPORT_NEEDS and req.marker is None
    ]


def server_closure() -> list[str]:
    """SERVER_PACKAGES and their requirements, at the versions installed here (so the GPU
    run uses what the tests here use), less what the image has."""
    env = {"python_version": "3.12", "sys_platform": "linux", "implementation_name": "cpython"}
    seen: dict[str, str] = {}
    todo = list(SERVER_PACKAGES)
    while todo:
        name = norm(todo.pop())
        if name in seen or name in ON_IMAGE:
            continue
        seen[name] = importlib.metadata.version(name)
        for line in importlib.metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env | {"extra": ""}):
                todo.append(req.name)
    return [f"{n}=={v}" for n, v in sorted(seen.items())]


def repack_xz(wheel: Path, dest: Path) -> None:
    """The wheel's files as a .tar.xz: the same files (dist-info included), smaller."""
    with zipfile.ZipFile(wheel) as zf, tarfile.open(dest, "w:xz", preset=9) as tf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            member = tarfile.TarInfo(info.filename)
            member.size = info.file_size
            member.mode = (info.external_attr >> 16) & 0o777 or 0o644
            with zf.open(info) as f:
                tf.addfile(member, f)


def ignore_gpu_dir() -> None:
    exclude = subprocess.run(
        ["git", "rev-parse", "--git-path", "info/exclude"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    path = ROOT / exclude
    lines = path.read_text().splitlines() if path.exists() else []
    if "/.gpu/" not in lines:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join([*lines, "/.gpu/"]) + "\n")


def write_sharegpt(dest: Path, tokenizer, num_prompts: int) -> None:
    """The conversations behind a seeded sample of `num_prompts` (with a margin: on the GPU
    machine the same filters run again over these alone)."""
    from radixserve.bench.datasets import load_sharegpt_pairs, sample_sharegpt

    chosen = {r.prompt for r in sample_sharegpt(num_prompts + num_prompts // 5, tokenizer, seed=1)}
    records, kept = [], set()
    for prompt, reply in load_sharegpt_pairs():
        if prompt in chosen and prompt not in kept:
            kept.add(prompt)
            records.append(
                {
                    "conversations": [
                        {"from": "human", "value": prompt},
                        {"from": "gpt", "value": reply},
                    ]
                }
            )
    dest.write_text(json.dumps(records))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep-flashinfer", action="store_true", help="reuse .gpu/flashinfer.tar.xz")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "server"))
    from radixserve.models.loader import load_tokenizer, resolve_model

    ignore_gpu_dir()
    GPU_DIR.mkdir(exist_ok=True)
    packed = GPU_DIR / "flashinfer.tar.xz"
    pin = flashinfer_pin()
    keep = args.keep_flashinfer and packed.exists()
    if keep and packed_metadata(packed)["Version"] not in pin.specifier:
        print(f"{packed} holds {packed_metadata(packed)['Version']}, not {pin}: replacing it")
        keep = False
    if not keep:
        with tempfile.TemporaryDirectory() as tmp:
            pip_download([str(pin)], Path(tmp))
            (wheel,) = Path(tmp).glob("flashinfer_python-*.whl")
            print(f"repacking {wheel.name} ({wheel.stat().st_size >> 20} MB) as xz", flush=True)
            repack_xz(wheel, packed)

    wheels = GPU_DIR / "wheels"
    for old in wheels.glob("*.whl"):
        old.unlink()
    wheels.mkdir(exist_ok=True)
    specs = [*flashinfer_needs(packed_metadata(packed)), *server_closure()]
    print("wheels:", " ".join(specs), flush=True)
    pip_download(specs, wheels)

    tokenizer = load_tokenizer(resolve_model(None))
    tokenizer.save_pretrained(GPU_DIR / "tokenizer")
    write_sharegpt(GPU_DIR / "sharegpt.json", tokenizer, SHAREGPT_PROMPTS)

    carried = sum(f.stat().st_size for f in GPU_DIR.rglob("*") if f.is_file())
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    tree = sum(
        (ROOT / f.decode()).stat().st_size for f in tracked if f and (ROOT / f.decode()).is_file()
    )
    print(
        f".gpu/: {carried / 2**20:.1f} MiB; with the working tree {(carried + tree) / 2**20:.1f} MiB"
    )
    if carried + tree > 0.95 * CARRY_LIMIT:
        print("too close to the 64 MiB a device call carries", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
