"""50 streaming clients leave at random points (before the response starts, after a few
events, chat and completions alike): afterwards no sequence is left running or admitted,
the KV cache holds nothing for requests, and the engine generated only a sliver of what the
requests asked for."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from api_harness import metrics, wait_idle

pytestmark = pytest.mark.slow
CLIENTS = 50
MAX_TOKENS = 2000


async def _leave_early(h: httpx.AsyncClient, i: int, rng: random.Random) -> int:
    """One client: reads `k` events and closes its connection, or (every tenth) gives up
    before the response starts; returns the events it read."""
    k = 0 if i % 10 == 0 else rng.randint(1, 8)
    if i % 2:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}
    else:
        path, body = "/v1/completions", {"prompt": f"Story number {i}:"}
    body |= {"max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
    if k == 0:
        task = asyncio.ensure_future(h.post(path, json=body))
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return 0
    read = 0
    async with h.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            read += line.startswith("data: {")
            if read >= k:
                break  # leaving the block drops the half-read connection
    return read


async def test_50_streams_disconnect_at_random_points(api_server):
    before = wait_idle(api_server)
    rng = random.Random(50)
    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=api_server.url, timeout=120, limits=limits) as h:
        read = await asyncio.gather(*(_leave_early(h, i, rng) for i in range(CLIENTS)))
    assert read.count(0) == CLIENTS // 10 and max(read) >= 5  # both ways of leaving
    after = wait_idle(api_server)  # no sequence running or waiting, no KV held
    m = metrics(api_server)
    assert m[("radixserve_open_sequences", ())] == 0
    assert m[("radixserve_queued_prompt_tokens", ())] == 0
    assert m[("radixserve_num_running_reqs", ())] == 0
    assert m[("radixserve_kv_cache_usage_ratio", ())] == 0
    info = httpx.get(api_server.url + "/server_info").json()
    assert info["in_flight_requests"] == 1  # this /server_info request itself
    generated = after["generation_tokens"] - before["generation_tokens"]
    assert generated < CLIENTS * MAX_TOKENS / 20, generated
    r = httpx.post(
        api_server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
