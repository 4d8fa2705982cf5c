"""The GPU image's FlashInfer packages: pinned together, from one place (pyproject's gpu extra).

flashinfer-python refuses to import next to a flashinfer-cubin of another version, and
unpinned, the two resolve to different lines (each package's newest release).
"""

from __future__ import annotations

import pathlib
import re
import tomllib

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
