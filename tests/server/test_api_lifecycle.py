"""Start-up (503 then 200), the API key, SIGTERM drain, and a model that cannot load."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import pytest
from api_harness import DEFAULT_FLAGS, error_of, start_server

pytestmark = pytest.mark.slow
KEY = "sk-test-0123456789"


def test_unloadable_model_exits_1():
    server = start_server("--model", "/nonexistent/model.gguf")
    assert server.proc.wait(180) == 1
    assert "cannot load the model: /nonexistent/model.gguf" in server.log()


def test_health_auth_and_sigterm_drain():
    # a generous grace period: the stream must finish even on a slow, busy machine
    server = start_server(
        *DEFAULT_FLAGS, "--shutdown-timeout", "600", env={"RADIXSERVE_API_KEY": KEY}
    )
    try:
        seen = server.wait_healthy()
        assert 503 in seen, "health must answer 503 while the model loads"
        _check_auth(server)
        _check_drain(server)
    finally:
        server.stop()
    assert KEY not in server.log()


def _check_auth(server):
    url = server.url
    assert httpx.get(url + "/metrics").status_code == 200  # open to scrapers
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401
        assert error_of(r)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert client.models.list().data
    info = httpx.get(url + "/server_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["api_key"] == "***"


def _check_drain(server):
    """An in-flight stream completes after SIGTERM; new requests get 503; exit code 0."""
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True, "stream": True}
    started = threading.Event()
    result: dict = {}

    def stream():
        with httpx.stream(
            "POST", server.url + "/v1/completions", json=body, headers=auth, timeout=120
        ) as r:
            lines = []
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started.set()
            result["lines"] = lines

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(120)
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/health").status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi"}, headers=auth)
    assert r.status_code == 503 and error_of(r)["code"] == "server_draining"
    t.join(120)
    lines = result["lines"]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(x[6:]) for x in lines[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(60) == 0
