"""Admission control: a burst beyond running capacity + --max-queued-requests, or beyond
--max-queued-tokens prompt tokens waiting for prefill, gets fast 503s (OpenAI's error shape,
Retry-After), never a 500 or a hang, and every 200 is complete and correct."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter

import httpx
import pytest
from api_harness import DEFAULT_FLAGS, metrics, start_server, wait_idle

pytestmark = pytest.mark.slow
MAX_QUEUED_TOKENS = 500


@pytest.fixture(scope="module")
def small_server():
    server = start_server(
        *DEFAULT_FLAGS,
        "--max-running-requests",
        "2",
        "--max-queued-requests",
        "2",
        "--max-queued-tokens",
        str(MAX_QUEUED_TOKENS),
    )
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


async def burst(url: str, n: int) -> list[httpx.Response]:
    body = {
        "prompt": "Count with me: one, two,",
        "max_tokens": 24,
        "ignore_eos": True,
        "temperature": 0,
    }
    async with httpx.AsyncClient(base_url=url, timeout=300) as h:
        return await asyncio.gather(*(h.post("/v1/completions", json=body) for _ in range(n)))


async def test_burst_gets_only_complete_200s_and_503s(small_server):
    responses = await burst(small_server.url, 16)
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503}, statuses
    assert statuses.count(200) >= 4  # two running + two queued are always admitted
    texts = set()
    for r in responses:
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == 24
            texts.add(r.json()["choices"][0]["text"])
        else:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "server_overloaded"
    assert len(texts) == 1  # same greedy request, same answer, whatever the load
    # every reservation was released: a full-capacity wave is admitted again
    again = await burst(small_server.url, 4)
    assert [r.status_code for r in again] == [200] * 4
    assert httpx.get(small_server.url + "/health").status_code == 200


class _Stream:
    """A streamed completion whose response has started (so it was admitted). One line
    iterator for its whole life: dropping an httpx iterator half-read closes the connection."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()

    @classmethod
    async def open(cls, h: httpx.AsyncClient, body: dict) -> _Stream:
        response = await h.send(h.build_request("POST", "/v1/completions", json=body), stream=True)
        assert response.status_code == 200, await response.aread()
        return cls(response)

    async def next_event(self) -> dict | None:
        async for line in self.lines:
            if line.startswith("data: {"):
                return json.loads(line[6:])
        return None

    async def rest(self) -> list[dict]:
        events = []
        while (e := await self.next_event()) is not None:
            events.append(e)
        return events


async def test_queued_prompt_tokens_beyond_limit_get_503(small_server):
    """Two long generations take both running slots; a 300-token prompt then waits for
    prefill; a second one would make 600 > 500 waiting prompt tokens: 503. A short request
    with a timeout is admitted and times out waiting. Once the slots free, the waiting one
    runs and the refused one is admitted."""
    url = small_server.url
    long_prompt = "hello " * 300
    n_long = len(httpx.post(url + "/tokenize", json={"prompt": long_prompt}).json()["tokens"])
    assert MAX_QUEUED_TOKENS / 2 < n_long <= MAX_QUEUED_TOKENS
    blocker = {"prompt": "Count:", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    short = {"prompt": long_prompt, "max_tokens": 1, "temperature": 0}
    async with httpx.AsyncClient(base_url=url, timeout=300) as h:
        blockers = [await _Stream.open(h, blocker) for _ in range(2)]
        for b in blockers:
            assert await b.next_event()  # decoding: they hold both slots, wait for nothing
        waiting = await _Stream.open(h, {**short, "stream": True})
        m = metrics(small_server)
        assert m[("radixserve_queued_prompt_tokens", ())] == n_long
        assert m[("radixserve_open_sequences", ())] == 3
        refused = await h.post("/v1/completions", json=short)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        err = refused.json()["error"]
        assert err["code"] == "server_overloaded" and "prompt tokens" in err["message"]
        assert err["type"] == "server_error"
        # a request that can only wait times out waiting: abort, nothing generated
        waited = await h.post("/v1/completions", json={"prompt": "Hi", "timeout": 1})
        assert waited.status_code == 200, waited.text
        assert waited.json()["choices"][0]["finish_reason"] == "abort"
        assert waited.json()["usage"]["completion_tokens"] == 0
        assert metrics(small_server)[("radixserve_open_sequences", ())] == 3
        for b in blockers:
            await b.response.aclose()  # the clients leave: their sequences are aborted
        events = await waiting.rest()
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        again = await h.post("/v1/completions", json=short)
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 1
    wait_idle(small_server)
    m = metrics(small_server)
    assert m[("radixserve_queued_prompt_tokens", ())] == 0
    assert m[("radixserve_open_sequences", ())] == 0


PROMPTS = [
    "Count with me: one, two,",
    "The capital of France is",
    "List three colors:",
    "Once upon a time",
    "2 + 2 =",
    "The opposite of hot is",
    "Hello, my name is",
    "Water boils at",
]
LOAD_REQUESTS = 300
LOAD_CLIENTS = 24  # six times the 4 sequences that are ever admitted at once
LOAD_TOKENS = 3


async def _complete(h: httpx.AsyncClient, prompt: str, stream: bool) -> tuple[int, dict]:
    """(status, {"text", "tokens", "finish"} or the error body), streamed or not."""
    body = {"prompt": prompt, "max_tokens": LOAD_TOKENS, "ignore_eos": True, "temperature": 0}
    if not stream:
        r = await h.post("/v1/completions", json=body)
        if r.status_code != 200:
            return r.status_code, {**r.json(), "retry-after": r.headers.get("retry-after")}
        out = r.json()
        choice = out["choices"][0]
        return 200, {
            "text": choice["text"],
            "tokens": out["usage"]["completion_tokens"],
            "finish": choice["finish_reason"],
        }
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    async with h.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, {
                **json.loads(await r.aread()),
                "retry-after": r.headers.get("retry-after"),
            }
        lines = [x async for x in r.aiter_lines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    events = [json.loads(x[6:]) for x in lines[:-1]]
    assert all("error" not in e for e in events), events
    choices = [e["choices"][0] for e in events if e["choices"]]
    return 200, {
        "text": "".join(c["text"] for c in choices),
        "tokens": events[-1]["usage"]["completion_tokens"],
        "finish": choices[-1]["finish_reason"],
    }


async def test_load_bursts_only_complete_correct_200s_and_503s(small_server):
    """A few hundred requests from clients at six times capacity, sending back to back (a
    refused one retries after 0.1-0.4 s), half of them streamed: only 200s and 503s, no
    timeout, every 200 has all its tokens and the greedy reference text."""
    rng = random.Random(7)
    results: list[tuple[str, int, dict]] = []
    sent = 0
    async with httpx.AsyncClient(base_url=small_server.url, timeout=120) as h:
        reference = {}
        for p in PROMPTS:
            status, out = await _complete(h, p, stream=False)
            assert status == 200
            reference[p] = out["text"]

        async def client() -> None:
            nonlocal sent
            while sent < LOAD_REQUESTS:
                prompt, stream = PROMPTS[sent % len(PROMPTS)], sent % 2 == 1
                sent += 1
                status, out = await _complete(h, prompt, stream)
                results.append((prompt, status, out))
                if status == 503:
                    await asyncio.sleep(rng.uniform(0.1, 0.4))

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(LOAD_CLIENTS)))
        elapsed = time.monotonic() - started
    statuses = Counter(status for _, status, _ in results)
    assert set(statuses) <= {200, 503}, statuses
    assert len(results) == LOAD_REQUESTS and statuses[200] >= len(PROMPTS), statuses
    assert statuses[503] > 0, statuses  # the burst really was beyond capacity
    for prompt, status, out in results:
        if status == 200:
            assert out["tokens"] == LOAD_TOKENS and out["finish"] == "length", out
            assert out["text"] == reference[prompt], (prompt, out, reference[prompt])
        else:
            assert out["error"]["code"] == "server_overloaded" and out["retry-after"] == "1"
    print(f"load: {len(results)} requests in {elapsed:.1f}s: {dict(statuses)}")
    wait_idle(small_server)
    m = metrics(small_server)
    assert m[("radixserve_open_sequences", ())] == 0
    assert m[("radixserve_queued_prompt_tokens", ())] == 0
    assert httpx.get(small_server.url + "/health").status_code == 200
