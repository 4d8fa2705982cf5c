"""Streaming clients for the servers under test: one function per wire protocol.

Each client sends one `BenchRequest` greedily (temperature 0) and times the stream as it
arrives: the first chunk carrying output sets TTFT, every later one adds an ITL gap.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

from radixserve.bench.datasets import BenchRequest
from radixserve.bench.metrics import RequestResult

ENDPOINTS = {
    "radixserve": "/generate",
    "openai": "/v1/completions",
    "openai-chat": "/v1/chat/completions",
}


async def iter_sse(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[float, Any]]:
    """(arrival time, decoded JSON) for each `data:` event, until `[DONE]` or the end."""
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[len(b"data:") :].strip()
        if payload == b"[DONE]":
            return
        yield time.perf_counter(), json.loads(payload)


class _Timer:
    """Turns chunk arrival times into TTFT and ITL.

    A chunk that carries several tokens at once (a server may coalesce) spreads its gap evenly
    over them, as SGLang does, so ITL stays a per-token figure.
    """

    def __init__(self, result: RequestResult, start: float) -> None:
        self.result = result
        self.start = start
        self.last: float | None = None

    def tokens(self, now: float, count: int = 1) -> None:
        if count <= 0:
            return
        if self.last is None:
            self.result.ttft = now - self.start
            count -= 1
            if count:
                # The rest of a first chunk came with the first token: no gap to record.
                self.result.itl.extend([0.0] * count)
        else:
            gap = (now - self.last) / count
            self.result.itl.extend([gap] * count)
        self.last = now


OnEvent = Callable[[_Timer, float, Any], None]  # one decoded SSE event of a stream


async def _post_stream(
    session: aiohttp.ClientSession,
    url: str,
    payload: dict[str, Any],
    headers: dict[str, str],
    request: BenchRequest,
    on_event: OnEvent,
) -> RequestResult:
    result = RequestResult(
        prompt_len=request.prompt_len, constrained=request.json_schema is not None
    )
    start = time.perf_counter()
    timer = _Timer(result, start)
    try:
        async with session.post(url, json=payload, headers=headers) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:500]}"
                return result
            async for now, event in iter_sse(response):
                if isinstance(event, dict) and "error" in event:
                    result.error = json.dumps(event["error"])[:500]
                    return result
                on_event(timer, now, event)
        result.latency = time.perf_counter() - start
        result.success = timer.last is not None
        if not result.success:
            result.error = "stream ended without output"
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _radixserve(
    request: BenchRequest, model: str | None, ignore_eos: bool
) -> tuple[dict[str, Any], OnEvent]:
    """Native POST /generate; chunks carry the cumulative text and a running token count."""
    payload = {
        "text": request.prompt,
        "sampling_params": {
            "max_new_tokens": request.output_len,
            "temperature": 0.0,
            "ignore_eos": ignore_eos,
        },
        "stream": True,
    }
    if request.json_schema is not None:
        payload["sampling_params"]["json_schema"] = request.json_schema
    if request.model is not None:
        payload["lora_path"] = request.model
    seen = {"tokens": 0}

    def on_event(timer: _Timer, now: float, event: dict[str, Any]) -> None:
        meta = event.get("meta_info") or {}
        text = event.get("text", timer.result.generated_text)
        if "completion_tokens" in meta:
            total = int(meta["completion_tokens"])
        else:
            # Without a count, a chunk whose text grew stands for one token.
            total = seen["tokens"] + (text != timer.result.generated_text)
        timer.tokens(now, total - seen["tokens"])
        seen["tokens"] = total
        timer.result.generated_text = text
        timer.result.output_len = total

    return payload, on_event


def _on_openai_event(delta_of: Callable[[dict[str, Any]], str | None]) -> OnEvent:
    """Event handler for OpenAI streams: a non-empty delta is one token's arrival.

    The server's usage block (when it sends one) gives the exact completion token count;
    otherwise the caller counts the text with the tokenizer.
    """

    def on_event(timer: _Timer, now: float, event: dict[str, Any]) -> None:
        usage = event.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            timer.result.output_len = int(usage["completion_tokens"])
        for choice in event.get("choices") or []:
            delta = delta_of(choice)
            if delta:
                timer.tokens(now)
                timer.result.generated_text += delta

    return on_event


def _openai_payload(
    request: BenchRequest, model: str | None, ignore_eos: bool, **prompt: Any
) -> dict[str, Any]:
    """The body both OpenAI routes share: greedy, streamed with usage, the prompt given as
    `prompt` or `messages`, and a JSON-schema response_format for constrained requests."""
    payload = {
        "model": request.model or model,
        **prompt,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
    }
    if request.json_schema is not None:
        schema = json.loads(request.json_schema)
        payload["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "bench", "schema": schema},
        }
    return payload


def _openai(
    request: BenchRequest, model: str | None, ignore_eos: bool
) -> tuple[dict[str, Any], OnEvent]:
    """POST /v1/completions with the raw prompt (no chat template)."""
    payload = _openai_payload(request, model, ignore_eos, prompt=request.prompt)
    return payload, _on_openai_event(lambda c: c.get("text"))


def _openai_chat(
    request: BenchRequest, model: str | None, ignore_eos: bool
) -> tuple[dict[str, Any], OnEvent]:
    """POST /v1/chat/completions with the prompt as one user message."""
    messages = [{"role": "user", "content": request.prompt}]
    payload = _openai_payload(request, model, ignore_eos, messages=messages)
    return payload, _on_openai_event(lambda c: (c.get("delta") or {}).get("content"))


Sender = Callable[
    [aiohttp.ClientSession, str, BenchRequest, str | None, bool, dict[str, str]],
    Awaitable[RequestResult],
]


def _sender(
    backend: str,
    build: Callable[[BenchRequest, str | None, bool], tuple[dict[str, Any], OnEvent]],
) -> Sender:
    """The client for one backend: `build` makes its request body and its event handler;
    posting and timing the stream are the same for all."""

    async def send(
        session: aiohttp.ClientSession,
        base_url: str,
        request: BenchRequest,
        model: str | None,
        ignore_eos: bool,
        headers: dict[str, str],
    ) -> RequestResult:
        payload, on_event = build(request, model, ignore_eos)
        url = base_url + ENDPOINTS[backend]
        return await _post_stream(session, url, payload, headers, request, on_event)

    send.__doc__ = build.__doc__
    return send


send_radixserve = _sender("radixserve", _radixserve)
send_openai = _sender("openai", _openai)
send_openai_chat = _sender("openai-chat", _openai_chat)

BACKENDS: dict[str, Sender] = {
    "radixserve": send_radixserve,
    "openai": send_openai,
    "openai-chat": send_openai_chat,
}
