"""The online benchmark loop: warm up, send requests on a Poisson schedule, time them.

Arrivals are open-loop (requests are sent on schedule whatever the server's state) unless
`max_concurrency` caps how many are in flight, which models a fixed pool of clients.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence

import aiohttp
import numpy as np
from tqdm.asyncio import tqdm

from radixserve.bench.backends import BACKENDS
from radixserve.bench.datasets import BenchRequest
from radixserve.bench.metrics import BenchMetrics, RequestResult, compute_metrics


async def poisson_arrivals(
    requests: list[BenchRequest], rate: float, seed: int
) -> AsyncIterator[BenchRequest]:
    """Yield requests with exponential gaps of mean 1/rate; all at once when rate is inf."""
    rng = np.random.default_rng(seed)
    for i, request in enumerate(requests):
        yield request
        if rate != float("inf") and i + 1 < len(requests):
            await asyncio.sleep(float(rng.exponential(1.0 / rate)))


async def fetch_model_name(session: aiohttp.ClientSession, base_url: str, headers: dict) -> str:
    """The first model the server lists: OpenAI servers want a `model` in each request."""
    async with session.get(base_url + "/v1/models", headers=headers) as response:
        response.raise_for_status()
        return (await response.json())["data"][0]["id"]


async def run_benchmark(
    *,
    backend: str,
    base_url: str,
    requests: list[BenchRequest],
    count_tokens: Callable[[str], int],
    model: str | None = None,
    request_rate: float = float("inf"),
    max_concurrency: int | None = None,
    warmup: Sequence[BenchRequest] = (),
    ignore_eos: bool = True,
    seed: int = 0,
    api_key: str | None = None,
    progress: bool = True,
    max_duration: float | None = None,
) -> tuple[BenchMetrics, list[RequestResult]]:
    """Run `requests` against the server at `base_url` and summarise the timings.

    The `warmup` requests run first, concurrently, and are not counted: they absorb one-off
    costs such as lazy initialisation and first-time compilation. Output tokens
    are the server's own count where it reports one, else `count_tokens` of the text.

    With `max_duration`, requests still unfinished after that many seconds are cancelled
    and the summary covers the finished ones only (fewer results than requests): a slow
    server then still yields figures, over a shorter run.
    """
    send = BACKENDS[backend]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = aiohttp.ClientTimeout(total=6 * 3600)
    # a fresh connection per request, as SGLang's bench_serving does (a session per request):
    # reusing keep-alive connections races servers that close idle ones (llama-server), and
    # the lost requests would count against the server
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        if model is None and backend != "radixserve":
            model = await fetch_model_name(session, base_url, headers)

        if warmup:
            outcomes = await asyncio.gather(
                *(send(session, base_url, r, model, ignore_eos, headers) for r in warmup)
            )
            if not any(o.success for o in outcomes):
                raise RuntimeError(f"warm-up failed: {outcomes[0].error}")

        semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        bar = tqdm(total=len(requests), disable=not progress, desc=f"{backend}", unit="req")

        results: list[RequestResult] = []

        async def one(request: BenchRequest) -> None:
            if semaphore is None:
                result = await send(session, base_url, request, model, ignore_eos, headers)
            else:
                async with semaphore:
                    result = await send(session, base_url, request, model, ignore_eos, headers)
            results.append(result)
            bar.update(1)

        tasks: list[asyncio.Task] = []

        async def run_all() -> None:
            async for request in poisson_arrivals(requests, request_rate, seed):
                tasks.append(asyncio.create_task(one(request)))
            await asyncio.gather(*tasks)

        start = time.perf_counter()
        try:
            await asyncio.wait_for(run_all(), timeout=max_duration)
        except TimeoutError:
            # Report the finished requests; cancel the rest, including any not yet gathered.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        duration = time.perf_counter() - start
        bar.close()

    for result in results:
        if result.success and result.output_len == 0:
            result.output_len = count_tokens(result.generated_text)
    return compute_metrics(results, duration), results
