"""What the one-server bench scripts (priority.py, scrape_cost.py) share: a `radixserve
serve` on a free loopback port for the length of a `with` block, and the CPU line every
figure must carry (model, cores and the class radixserve's CPU path picks by)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def serve(flags: list[str], log_prefix: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """(url, process) of a healthy server started with `flags`; stopped on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix=log_prefix, suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "radixserve.cli", "serve", "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"server did not start; log: {log.name}")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(60)


def cpu_line() -> str:
    """e.g. "Intel(R) Xeon(R) Processor x2, class bf16 (AVX512)": figures differ by class."""
    from radixserve.engine.cpu_path import cpu_class

    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    cls, capability = cpu_class()
    return f"{model} x{os.cpu_count()}, class {cls} ({capability})"
