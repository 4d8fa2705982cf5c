"""The GPU image's FlashInfer packages: pinned together, from one place (pyproject's gpu extra),
which the GPU benchmark (bench/gpu) reads too.

flashinfer-python refuses to import next to a flashinfer-cubin of another version, and
unpinned, the two resolve to different lines (each package's newest release).
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import tomllib
import zipfile
from types import ModuleType

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_gpu_extra_pins_flashinfer_python_and_cubin_to_one_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for requirement in project["optional-dependencies"]["gpu"]:
        found = re.fullmatch(r"(flashinfer-(?:python|cubin))==([\w.]+)", requirement)
        assert found, f"{requirement!r}: FlashInfer packages must be pinned with =="
        pins[found[1]] = found[2]
    assert set(pins) == {"flashinfer-python", "flashinfer-cubin"}
    assert len(set(pins.values())) == 1, pins


def test_dockerfile_installs_flashinfer_only_through_the_gpu_extra() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    run_lines = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert any('".[gpu]"' in line for line in run_lines)
    assert not [line for line in run_lines if re.search(r"\bflashinfer-\w+", line)]


def load_prepare() -> ModuleType:
    path = ROOT / "bench" / "gpu" / "prepare.py"
    spec = importlib.util.spec_from_file_location("gpu_prepare", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_carries_the_flashinfer_the_image_installs() -> None:
    """bench/gpu measures the FlashInfer the server image ships: it reads the pin from the
    gpu extra instead of keeping its own (which had drifted to another line)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (pinned,) = [
        r for r in project["optional-dependencies"]["gpu"] if r.startswith("flashinfer-python")
    ]
    assert str(load_prepare().flashinfer_pin()) == pinned
    for script in (ROOT / "bench" / "gpu").glob("*.py"):
        assert not re.search(r"flashinfer-\w+\s*[=<>~]=", script.read_text()), script.name


def test_gpu_bench_takes_tvm_ffi_from_the_packed_wheels_metadata(tmp_path: pathlib.Path) -> None:
    """What `import flashinfer` needs beyond the GPU image comes in the range the wheel asks
    for, read back from the xz pack that travels (no network: a stand-in wheel)."""
    prepare = load_prepare()
    wheel = tmp_path / "flashinfer_python-9.9.9-py3-none-any.whl"
    metadata = "\n".join(
        [
            "Metadata-Version: 2.1",
            "Name: flashinfer-python",
            "Version: 9.9.9",
            "Requires-Dist: apache-tvm-ffi!=0.1.8,<0.2,>=0.1.6",
            "Requires-Dist: einops",
            'Requires-Dist: cuda-python>=13.0; extra == "nvep"',
        ]
    )
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("flashinfer/__init__.py", "")
        zf.writestr("flashinfer_python-9.9.9.dist-info/METADATA", metadata + "\n")
    packed = tmp_path / "flashinfer.tar.xz"
    prepare.repack_xz(wheel, packed)

    found = prepare.packed_metadata(packed)
    assert found["Version"] == "9.9.9"
    assert prepare.flashinfer_needs(found) == ["apache-tvm-ffi!=0.1.8,<0.2,>=0.1.6"]
