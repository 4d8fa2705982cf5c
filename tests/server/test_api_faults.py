"""Faults, on servers of their own: the engine process killed mid-stream, the engine stalled
(SIGSTOP: no loop progress for --watchdog-timeout), and --request-timeout. A dead or stalled
engine turns /health to 503, fails in-flight requests (a stream's last event is an error, a
plain request gets a 503) and the server exits non-zero so Kubernetes restarts it; nothing
hangs. (SIGTERM during a stream: test_api_lifecycle.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import pytest
from api_harness import DEFAULT_FLAGS, Server, start_server

pytestmark = pytest.mark.slow
REQUEST_TIMEOUT = 8.0
WATCHDOG_TIMEOUT = 5.0
LONG = {"prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True}


@pytest.fixture(scope="module")
def servers():
    """One server per fault (each fault ends its server)."""
    killed = start_server(*DEFAULT_FLAGS, "--request-timeout", str(REQUEST_TIMEOUT))
    stalled = start_server(*DEFAULT_FLAGS, "--watchdog-timeout", str(WATCHDOG_TIMEOUT))
    pids: list[int] = []
    try:
        for s in (killed, stalled):
            s.wait_healthy()
            pids.append(httpx.get(s.url + "/server_info").json()["engine_pid"])
        yield {"killed": killed, "stalled": stalled}
    finally:
        for s in (killed, stalled):
            s.stop()
        for pid in pids:  # a stopped engine that outlived its server would never exit
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class InFlight:
    """One streamed and one plain request, both generating when the fault comes."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.plain: dict = {}
        self.stream = httpx.stream(
            "POST", server.url + "/v1/completions", json={**LONG, "stream": True}, timeout=120
        )
        self.response = self.stream.__enter__()
        self.lines = self.response.iter_lines()
        self.events = [self._next_event(), self._next_event()]  # it is generating
        self.thread = threading.Thread(target=self._plain)
        self.thread.start()
        deadline = time.monotonic() + 60
        while self._open_sequences() < 2:
            assert time.monotonic() < deadline, "the plain request never started"
            time.sleep(0.05)

    def _next_event(self) -> dict:
        return json.loads(next(x for x in self.lines if x.startswith("data: {"))[6:])

    def _open_sequences(self) -> float:
        text = httpx.get(self.server.url + "/metrics").text
        line = next(x for x in text.splitlines() if x.startswith("radixserve_open_sequences "))
        return float(line.split()[1])

    def _plain(self) -> None:
        r = httpx.post(self.server.url + "/v1/completions", json=LONG, timeout=120)
        self.plain = {"status": r.status_code, "body": r.json()}

    def finish(self) -> tuple[list[str], dict]:
        """The stream's remaining lines (until the server closes it) and the plain answer."""
        rest = [x for x in self.lines if x]
        self.stream.__exit__(None, None, None)
        self.thread.join(120)
        assert not self.thread.is_alive(), "the plain request hangs"
        return rest, self.plain


def watch_until_exit(server: Server, timeout: float = 90) -> tuple[list[int], int]:
    """/health statuses until the server process exits, and its exit code."""
    statuses = []
    deadline = time.monotonic() + timeout
    while server.proc.poll() is None:
        assert time.monotonic() < deadline, "the server did not exit"
        try:
            statuses.append(httpx.get(server.url + "/health", timeout=5).status_code)
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return statuses, server.proc.returncode


def assert_failed_cleanly(rest: list[str], plain: dict, why: str) -> None:
    events = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
    assert rest[-1] == "data: [DONE]", rest[-3:]
    error = events[-1]["error"]  # the last event before [DONE]
    assert error["code"] == "engine_error" and why in error["message"], error
    assert all("error" not in e for e in events[:-1])
    assert plain["status"] == 503, plain
    assert plain["body"]["error"]["code"] == "engine_error", plain


async def _timed(h: httpx.AsyncClient, extra: dict) -> tuple[float, dict]:
    started = time.monotonic()
    r = await h.post("/v1/completions", json={**LONG, **extra})
    assert r.status_code == 200, r.text
    return time.monotonic() - started, r.json()


async def test_request_timeout_is_the_default_and_the_upper_bound(servers):
    async with httpx.AsyncClient(base_url=servers["killed"].url, timeout=120) as h:
        (default, a), (longer, b), (shorter, c) = await asyncio.gather(
            _timed(h, {}), _timed(h, {"timeout": 60}), _timed(h, {"timeout": 1})
        )
    for out in (a, b, c):
        assert out["choices"][0]["finish_reason"] == "abort"
        assert out["usage"]["completion_tokens"] < 3000
    assert REQUEST_TIMEOUT <= default < REQUEST_TIMEOUT + 20
    assert REQUEST_TIMEOUT <= longer < REQUEST_TIMEOUT + 20  # 60 s asked, 8 s given
    assert 1 <= shorter < REQUEST_TIMEOUT


def test_engine_killed_mid_stream(servers):
    server = servers["killed"]
    pid = httpx.get(server.url + "/server_info").json()["engine_pid"]
    flight = InFlight(server)
    os.kill(pid, signal.SIGKILL)
    rest, plain = flight.finish()
    statuses, code = watch_until_exit(server)
    assert_failed_cleanly(rest, plain, "exited")
    assert 503 in statuses and 200 not in statuses, statuses
    assert code == 1
    assert "engine died" in server.log()


def test_engine_stalled_past_watchdog(servers):
    server = servers["stalled"]
    pid = httpx.get(server.url + "/server_info").json()["engine_pid"]
    flight = InFlight(server)
    stopped = time.monotonic()
    os.kill(pid, signal.SIGSTOP)  # alive, but its loop makes no progress
    rest, plain = flight.finish()
    failed_after = time.monotonic() - stopped
    statuses, code = watch_until_exit(server)
    assert_failed_cleanly(rest, plain, "no progress")
    assert failed_after >= WATCHDOG_TIMEOUT - 0.5, failed_after
    assert 503 in statuses and 200 not in statuses, statuses
    assert code == 1
    assert f"engine made no progress for {WATCHDOG_TIMEOUT:.0f}s" in server.log()
