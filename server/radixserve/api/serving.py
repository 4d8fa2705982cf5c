"""What the OpenAI and native routes share: sampling params from a request, starting the
sequences of a request (n per prompt) with metrics attached, merging their streams, SSE
framing, and cancelling work whose client went away.

Every sequence is streamed from the engine, even for non-streamed responses, so the
time-to-first-token and inter-token histograms measure the same thing in both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse

from radixserve.api.errors import APIError, bad_request, error_body, from_value_error
from radixserve.api.state import ServerState
from radixserve.engine.client import EngineError, GenerateChunk
from radixserve.engine.io_struct import FinishAbort
from radixserve.engine.sampling_params import SamplingParams

DONE = "data: [DONE]\n\n"
# the most sequences (prompts x n) one request may start: bounds the work one body can queue
MAX_SEQUENCES = 2048
# the engine's names -> the OpenAI request's names, for error messages
_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


def sse(obj: BaseModel | dict) -> str:
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


def sse_error(e: Exception) -> str:
    """The last event of a stream that failed after its 200 went out."""
    if isinstance(e, APIError):
        return sse(error_body(e.status, e.message, e.param, e.code))
    return sse(error_body(503, f"engine unavailable: {e}", code="engine_error"))


class SSEResponse(StreamingResponse):
    """A stream whose generator is closed however the response ends, so a client that
    disconnects aborts its sequences in the engine right away, not at garbage collection."""

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def make_params(fields: dict[str, Any], state: ServerState, openai_names: bool) -> SamplingParams:
    """SamplingParams from request fields (None = default); ValueError -> 400 naming the field."""
    try:
        params = SamplingParams.from_dict({k: v for k, v in fields.items() if v is not None})
        params.verify(state.info.vocab_size)
    except (ValueError, TypeError) as e:
        err = from_value_error(ValueError(str(e)))
        if openai_names and err.param in _OPENAI_NAMES:
            name = _OPENAI_NAMES[err.param]
            err.message = err.message.replace(err.param, name, 1)
            err.param = name
        raise err from e
    return params


def check_prompt(
    state: ServerState, ids: list[int], max_tokens: int | None, param: str, max_param: str
) -> None:
    """400 for an empty prompt, ids outside the vocabulary, or a request beyond the context."""
    if not ids:
        raise bad_request(f"{param}: the prompt is empty", param)
    vocab = state.info.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(
            f"{param}: token id {bad} is outside the vocabulary (size {vocab})", param
        )
    ctx = state.info.context_length
    if len(ids) >= ctx:
        raise bad_request(
            f"This model's maximum context length is {ctx} tokens, but the prompt has "
            f"{len(ids)} tokens.",
            param,
        )
    if max_tokens is not None and len(ids) + max_tokens > ctx:
        raise bad_request(
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} in the "
            f"completion). Please reduce the prompt or {max_param}.",
            max_param,
        )


@dataclass
class Sequences:
    """The running sequences of one request: `streams[i]` yields the chunks of choice i."""

    rid: str
    streams: list[AsyncIterator[GenerateChunk]]
    n: int
    arrival: float = field(default_factory=time.perf_counter)

    def merged(self) -> AsyncIterator[GenerateChunk]:
        return merge(self.streams)

    async def aclose(self) -> None:
        for s in self.streams:
            await s.aclose()


def check_batch(num_prompts: int, n: int, param: str) -> None:
    """400 for a request that would start more sequences than MAX_SEQUENCES."""
    if num_prompts * n > MAX_SEQUENCES:
        name = param if num_prompts > MAX_SEQUENCES else "n"  # n=1 would not fit either
        raise bad_request(
            f"{name}: {num_prompts} prompt(s) x n={n} is more than the {MAX_SEQUENCES} "
            "sequences one request may start",
            name,
        )


def check_text(text: str, param: str) -> str:
    """400 for a string that is not Unicode text: JSON's "\\ud800" escape decodes to a lone
    surrogate, which the tokenizer would refuse with a TypeError (a 500)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(
            f"{param}: not valid Unicode (a lone surrogate at character {e.start})", param
        ) from e
    return text


def deadline_of(state: ServerState, timeout: float | None) -> float | None:
    """time.monotonic() by which the request ends: its own `timeout` or --request-timeout,
    whichever is shorter (a client may shorten the server's limit, not extend it)."""
    limits = [t for t in (timeout, state.args.request_timeout) if t is not None]
    return time.monotonic() + min(limits) if limits else None


async def off_loop(fn, *args, **kwargs):
    """Run tokenizer work (templates, encoding) in a worker thread: a huge prompt then
    costs its own request time, not the event loop's (/health and every stream)."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def start_sequences(
    state: ServerState,
    prompts: list[list[int]],
    params: list[SamplingParams],
    route: str,
    rid: str | None = None,
    return_logprob: bool = False,
    top_logprobs_num: int = 0,
    timeout: float | None = None,
) -> Sequences:
    """n sequences per prompt, choice index = prompt * n + i (OpenAI's order)."""
    rid = rid or uuid.uuid4().hex
    arrival = time.perf_counter()
    kw = {
        "stream": True,
        "return_logprob": return_logprob,
        "top_logprobs_num": top_logprobs_num,
        "deadline": deadline_of(state, timeout),
    }
    if rid in state.active_rids or any(r.startswith(f"{rid}-") for r in state.active_rids):
        raise bad_request(f"rid: request id {rid!r} is already in use", "rid")
    tickets = _admit(
        state, [len(ids) for ids, p in zip(prompts, params, strict=True) for _ in range(p.n)]
    )

    async def one(j: int) -> list[AsyncIterator[GenerateChunk]]:
        sub = rid if len(prompts) == 1 else f"{rid}-p{j}"
        return await state.client.generate_n(prompts[j], params[j], params[j].n, rid=sub, **kw)

    groups = await asyncio.gather(*(one(j) for j in range(len(prompts))), return_exceptions=True)
    failed = next((g for g in groups if isinstance(g, BaseException)), None)
    if failed is not None:
        for g in groups:
            if not isinstance(g, BaseException):
                for s in g:
                    await s.aclose()
        for ticket in tickets:
            ticket.free()
        if isinstance(failed, EngineError):
            raise APIError(503, f"engine unavailable: {failed}", code="engine_error")
        raise failed
    streams = []
    base = 0
    for g in groups:
        for i, s in enumerate(g):
            ticket = tickets[len(streams)]
            tracked = _tracked(state, s, base + i, state.metrics.timer(arrival, route), ticket)
            # a stream closed or dropped before it ever ran skips its finally: free it then
            weakref.finalize(tracked, ticket.free)
            streams.append(tracked)
        base += len(g)
    return Sequences(rid, streams, params[0].n, arrival)


def _admit(state: ServerState, prompt_lens: list[int]) -> list[_AdmissionTicket]:
    """Reserve one ticket per sequence before anything is awaited, so a burst is counted
    exactly. Beyond the running capacity plus --max-queued-requests sequences, or beyond
    --max-queued-tokens prompt tokens waiting for their first token, answer 503 at once
    (SGLang/vLLM users expect a fast refusal with Retry-After rather than an unbounded
    queue). A prompt longer than the token limit is still admitted when none waits."""
    args, running = state.args, state.info.max_running_requests
    if args.max_queued_requests is not None:
        if state.open_sequences + len(prompt_lens) - running > args.max_queued_requests:
            raise _overloaded(
                f"{state.open_sequences} sequences in flight, at most "
                f"{args.max_queued_requests} may wait beyond the {running} running"
            )
    limit = args.max_queued_tokens
    if limit is not None and state.queued_tokens and state.queued_tokens + sum(prompt_lens) > limit:
        raise _overloaded(
            f"{state.queued_tokens} prompt tokens wait for prefill, at most {limit} may"
        )
    return [_AdmissionTicket(state, n) for n in prompt_lens]


def _overloaded(why: str) -> APIError:
    return APIError(
        503,
        f"server overloaded: {why}; retry later",
        code="server_overloaded",
        headers={"Retry-After": "1"},
    )


class _AdmissionTicket:
    """One admitted sequence in the admission counters. Its prompt tokens count as queued
    until its first output (it has been prefilled then); the sequence counts until it ends.
    Each is given back exactly once, however the sequence ends."""

    def __init__(self, state: ServerState, prompt_tokens: int) -> None:
        self.state: ServerState | None = state
        self.queued = prompt_tokens
        state.open_sequences += 1
        state.queued_tokens += prompt_tokens

    def started(self) -> None:
        if self.state is not None and self.queued:
            self.state.queued_tokens -= self.queued
            self.queued = 0

    def free(self) -> None:
        self.started()
        if self.state is not None:
            self.state.open_sequences -= 1
            self.state = None


async def _tracked(
    state: ServerState, stream, index: int, timer, ticket: _AdmissionTicket
) -> AsyncIterator[GenerateChunk]:
    rid = None
    try:
        async for chunk in stream:
            if rid is None:
                rid = chunk.rid
                state.active_rids.add(rid)
                ticket.started()
            chunk.index = index
            fr = chunk.finish_reason
            if isinstance(fr, FinishAbort) and fr.status_code:
                # the engine refused the request itself (e.g. a grammar that won't compile)
                raise APIError(fr.status_code, fr.message)
            timer.on_chunk(chunk)
            yield chunk
    finally:
        if rid is not None:
            state.active_rids.discard(rid)
        ticket.free()
        await stream.aclose()


async def merge(streams: list[AsyncIterator[GenerateChunk]]) -> AsyncIterator[GenerateChunk]:
    """Chunks of several sequences as they come; closing this closes them all."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield chunk
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(s: AsyncIterator[GenerateChunk]) -> None:
        try:
            async for chunk in s:
                await queue.put(chunk)
        except Exception as e:  # handed to the consumer
            await queue.put(e)
        finally:
            await queue.put(end)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is end:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Final:
    """A finished sequence: its last chunk and the logprobs of all its tokens."""

    chunk: GenerateChunk
    logprobs: list = field(default_factory=list)


async def collect(seqs: Sequences) -> list[Final]:
    """Run every sequence to its end; results in choice order."""
    finals: dict[int, Final] = {}
    try:
        async for chunk in seqs.merged():
            prev = finals.get(chunk.index)
            lps = (prev.logprobs if prev else []) + list(chunk.logprobs)
            finals[chunk.index] = Final(chunk, lps)
    except EngineError as e:
        raise APIError(503, f"engine unavailable: {e}", code="engine_error") from e
    return [finals[i] for i in sorted(finals)]


async def until_disconnected(request: Request, work: Awaitable):
    """Await `work`, cancelling it (and so aborting its sequences) if the client leaves."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise APIError(499, "client disconnected", code="client_disconnected")
    return task.result()


def finish_reason(chunk: GenerateChunk) -> tuple[str | None, int | str | None]:
    """OpenAI's finish_reason and SGLang's matched_stop from the engine's reason."""
    fr = chunk.finish_reason
    if fr is None:
        return None, None
    return fr.type, fr.matched_stop


def usage_of(finals_or_chunks: list[GenerateChunk], n: int) -> dict[str, Any]:
    """Usage over choices: each prompt counted once (choice 0 of its group), every completion."""
    prompt = sum(c.prompt_tokens for c in finals_or_chunks[::n])
    cached = sum(c.cached_tokens for c in finals_or_chunks[::n])
    completion = sum(c.completion_tokens for c in finals_or_chunks)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
