"""Per-request `timeout`: a request that runs too long ends with finish_reason "abort" (a 200
with what was generated so far, streamed or not) and the engine frees it. The server-wide
--request-timeout is tested in test_api_faults.py, a request that waited too long in
test_api_overload.py."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from api_harness import wait_idle

pytestmark = pytest.mark.slow
LONG = {"max_tokens": 3000, "ignore_eos": True}


def test_completion_times_out_with_abort_and_frees_kv(api_server):
    before = wait_idle(api_server)
    started = time.monotonic()
    r = httpx.post(
        api_server.url + "/v1/completions",
        json={"prompt": "Once upon a time", **LONG, "timeout": 1.5},
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["finish_reason"] == "abort"
    assert out["usage"]["completion_tokens"] < 3000
    assert 1.5 <= elapsed < 30, elapsed
    after = wait_idle(api_server)  # the engine dropped it: nothing running, no KV held
    assert after["generation_tokens"] - before["generation_tokens"] < 3000


def test_streamed_chat_times_out_with_abort(api_server):
    client = openai.OpenAI(base_url=api_server.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model=None,
        messages=[{"role": "user", "content": "Tell me a very long story."}],
        stream=True,
        max_tokens=3000,
        extra_body={"ignore_eos": True, "timeout": 1},
    )
    chunks = list(stream)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "abort" and reasons.count("abort") == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text  # what was generated before the deadline is delivered
    wait_idle(api_server)


def test_native_generate_timeout_says_why(api_server):
    r = httpx.post(
        api_server.url + "/generate",
        json={
            "text": "Once upon a time",
            "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True},
            "timeout": 1,
        },
        timeout=120,
    )
    meta = r.json()["meta_info"]
    assert meta["finish_reason"] == {"type": "abort", "message": "request timed out"}
    assert meta["completion_tokens"] == len(r.json()["output_ids"]) < 3000
    wait_idle(api_server)


def test_timeout_longer_than_the_work_changes_nothing(api_server):
    body = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    plain = httpx.post(api_server.url + "/v1/completions", json=body, timeout=120).json()
    timed = httpx.post(
        api_server.url + "/v1/completions", json={**body, "timeout": 600}, timeout=120
    ).json()
    assert timed["choices"][0]["text"] == plain["choices"][0]["text"]
    assert timed["choices"][0]["finish_reason"] == "length"
