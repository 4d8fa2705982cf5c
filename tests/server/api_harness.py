"""Start the real `radixserve serve` in a subprocess on a free loopback port, for API tests.

A model load takes ~20 s on a small CPU machine, so tests share a few servers (fixtures in
conftest.py) instead of starting one per test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

# float32: in bfloat16 a prompt served from the prefix cache can take a different greedy
# path than the same prompt computed afresh, and these tests compare such outputs exactly.
DEFAULT_FLAGS = ["--dtype", "float32", "--max-total-tokens", "32768"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_healthy(self, timeout: float = 240) -> list[int]:
        """Poll /health until 200; returns every status seen on the way."""
        seen: list[int] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                code = httpx.get(self.url + "/health", timeout=5).status_code
            except httpx.TransportError:
                code = 0  # not listening yet
            seen.append(code)
            if code == 200:
                return seen
            time.sleep(0.2)
        raise RuntimeError(f"server not healthy after {timeout}s:\n{self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(*flags: str, env: dict[str, str] | None = None) -> Server:
    """Launch `python -m radixserve.cli serve` without waiting for it."""
    port = free_port()
    fd, log_path = tempfile.mkstemp(prefix="radixserve-test-", suffix=".log")
    os.close(fd)
    cmd = [sys.executable, "-m", "radixserve.cli", "serve", "--port", str(port), *flags]
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    return Server(proc, port, log_path)


def error_of(response: httpx.Response) -> dict:
    """The OpenAI error object of a response, checking the shape on the way."""
    body = response.json()
    assert set(body) >= {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    return err


def metrics(server: Server) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    text = httpx.get(server.url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def wait_idle(server: Server, timeout: float = 60) -> dict:
    """Poll /server_info until the engine runs and holds nothing; its stats then."""
    deadline = time.monotonic() + timeout
    while True:
        stats = httpx.get(server.url + "/server_info").json()["stats"]
        idle = stats["num_running"] == 0 and stats["num_waiting"] == 0
        if idle and stats["kv_used_tokens"] == 0:
            return stats
        assert time.monotonic() < deadline, f"engine never went idle: {stats}"
        time.sleep(0.2)


def health_until_exit(server: Server, timeout: float = 60) -> list[int]:
    """Poll /health every 50 ms until the server process exits (or `timeout`): the statuses
    seen, in order, for tests that make the server fail and watch how it reports it."""
    statuses = []
    deadline = time.monotonic() + timeout
    while server.proc.poll() is None and time.monotonic() < deadline:
        try:
            statuses.append(httpx.get(server.url + "/health", timeout=5).status_code)
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return statuses
