"""The API's one path to the engine, whatever the protocol: a route's request adapter
makes a GenerationJob; `serve` submits it (admission, n sequences per prompt, metrics),
then streams or collects the sequences, and the API's Formatter writes the response or the
SSE events. Also SSE framing and cancelling work whose client went away.

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

from radixserve.api.admission import AdmissionTicket, overloaded
from radixserve.api.errors import APIError, bad_request, error_body
from radixserve.api.state import ServerState
from radixserve.engine.client import EngineError, GenerateChunk, sequence_rids
from radixserve.engine.io_struct import FinishAbort
from radixserve.engine.sampling_params import SamplingParams

DONE = "data: [DONE]\n\n"


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


def deadline_of(state: ServerState, timeout: float | None) -> float | None:
    """time.monotonic() by which the request ends: its own `timeout` or --request-timeout,
    whichever is shorter (a client may shorten the server's limit, not extend it)."""
    limits = [t for t in (timeout, state.args.request_timeout) if t is not None]
    return time.monotonic() + min(limits) if limits else None


async def off_loop(fn, *args, **kwargs):
    """Run tokenizer work (templates, encoding) in a worker thread: a huge prompt then
    costs its own request time, not the event loop's (/health and every stream)."""
    return await asyncio.to_thread(fn, *args, **kwargs)


@dataclass
class GenerationJob:
    """What a request adapter makes of one API's request: prompts as token ids, their
    sampling params (n each, the same n), and how to run them. API-neutral: every
    generation route hands one to `serve`."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    route: str  # the metrics label
    stream: bool = False
    rid: str | None = None
    return_logprob: bool = False
    top_logprobs_num: int = 0
    timeout: float | None = None
    priority: int = 0
    cache_salt: str | None = None
    logprob_start_len: int = -1  # prompt logprobs from this position (-1: none)
    loras: list[str | None] | None = None  # per prompt: its LoRA adapter (None = base)

    @classmethod
    def of(
        cls,
        req: Any,
        route: str,
        prompts: list[list[int]],
        params: list[SamplingParams],
        logprobs: bool = False,
        top_n: int = 0,
    ) -> GenerationJob:
        """A job taking stream, rid, timeout, priority and cache_salt from the request: every
        API names them so."""
        return cls(
            prompts,
            params,
            route,
            req.stream,
            req.rid,
            logprobs,
            top_n,
            req.timeout,
            req.priority,
            req.cache_salt,
        )


async def serve(request: Request, state: ServerState, job: GenerationJob, fmt: Formatter):
    """The one pass of every generation route: submit the job, then stream its events or
    collect its sequences, in the API's shape that `fmt` writes."""
    seqs = await start_sequences(state, job)
    if job.stream:
        return SSEResponse(stream_events(seqs, fmt))
    finals = await until_disconnected(request, collect(seqs))
    return fmt.response(seqs, finals)


async def start_sequences(state: ServerState, job: GenerationJob) -> Sequences:
    """n sequences per prompt, choice index = prompt * n + i (OpenAI's order)."""
    prompts, params = job.prompts, job.params
    rid = job.rid or uuid.uuid4().hex
    arrival = time.perf_counter()
    if job.priority and not state.args.enable_priority_scheduling:
        raise bad_request(
            "priority: the server does not schedule by priority (start it with "
            "--enable-priority-scheduling)",
            "priority",
        )
    kw = {
        "stream": True,
        "return_logprob": job.return_logprob,
        "top_logprobs_num": job.top_logprobs_num,
        "deadline": deadline_of(state, job.timeout),
        "priority": job.priority,
        "cache_salt": job.cache_salt,
        "logprob_start_len": job.logprob_start_len,
    }
    n = params[0].n
    tickets = state.admission.admit(
        rid, [len(p) for p in prompts], n, state.info.max_running_requests, job.priority
    )
    prompt_rids = sequence_rids(rid, len(prompts), 1)

    async def one(j: int) -> list[AsyncIterator[GenerateChunk]]:
        lora = job.loras[j] if job.loras else None
        return await state.client.generate_n(
            prompts[j], params[j], n, rid=prompt_rids[j], lora_name=lora, **kw
        )

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
            tracked = _tracked(s, base + i, state.metrics.timer(arrival, job.route), ticket)
            # a stream closed or dropped before it ever ran skips its finally: free it then
            weakref.finalize(tracked, ticket.free)
            streams.append(tracked)
        base += len(g)
    return Sequences(rid, streams, n, arrival)


async def _tracked(
    stream, index: int, timer, ticket: AdmissionTicket
) -> AsyncIterator[GenerateChunk]:
    try:
        async for chunk in stream:
            ticket.started()
            chunk.index = index
            fr = chunk.finish_reason
            if isinstance(fr, FinishAbort) and ticket.displaced:
                raise overloaded("a request of higher priority took its place in the queue")
            if isinstance(fr, FinishAbort) and fr.status_code:
                # the engine refused the request itself (e.g. a grammar that won't compile)
                raise APIError(fr.status_code, fr.message)
            timer.on_chunk(chunk)
            yield chunk
    finally:
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
    prompt_logprobs: list | None = None


async def collect(seqs: Sequences) -> list[Final]:
    """Run every sequence to its end; results in choice order."""
    finals: dict[int, Final] = {}
    try:
        async for chunk in seqs.merged():
            prev = finals.get(chunk.index)
            lps = (prev.logprobs if prev else []) + list(chunk.logprobs)
            prompt_lps = chunk.prompt_logprobs or (prev.prompt_logprobs if prev else None)
            finals[chunk.index] = Final(chunk, lps, prompt_lps)
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


class Formatter:
    """One API's output for one request: the whole response of a collected request, or the
    events of a streamed one (opening, one per chunk or none, closing)."""

    def response(self, seqs: Sequences, finals: list[Final]) -> Any:
        raise NotImplementedError

    def opening(self, seqs: Sequences) -> list[BaseModel | dict]:
        return []

    def event(self, seqs: Sequences, chunk: GenerateChunk) -> BaseModel | dict | list | None:
        """The event of one update (None: nothing to send; a list: several)."""
        raise NotImplementedError

    def closing(self, seqs: Sequences) -> list[BaseModel | dict]:
        return []

    # SSE framing: OpenAI's chat and completions send bare `data:` lines ending in [DONE];
    # APIs whose SDKs read named events (Responses, Anthropic's Messages) override these.
    done: str | None = DONE

    def frame(self, event: BaseModel | dict) -> str:
        return sse(event)

    def error_frame(self, e: Exception) -> str:
        return sse_error(e)

    def end(self) -> None:
        """Called once a stream is over, however it ended (finished, failed, client gone)."""


async def stream_events(seqs: Sequences, fmt: Formatter) -> AsyncIterator[str]:
    """The SSE stream of a request: its formatter's events, an error event if the engine or
    the request fails after the 200 went out, then [DONE] (if the API ends so); closing it
    aborts the sequences."""
    try:
        for event in fmt.opening(seqs):
            yield fmt.frame(event)
        async for chunk in seqs.merged():
            event = fmt.event(seqs, chunk)
            for e in event if isinstance(event, list) else [] if event is None else [event]:
                yield fmt.frame(e)
        for event in fmt.closing(seqs):
            yield fmt.frame(event)
    except (EngineError, APIError) as e:
        yield fmt.error_frame(e)
    finally:
        await seqs.aclose()
        fmt.end()
    if fmt.done is not None:
        yield fmt.done
