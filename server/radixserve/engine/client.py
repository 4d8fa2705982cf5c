"""The front's side of the engine: tokenizer, chat template, detokenization, stop strings.

Runs in the HTTP process (and behind the offline Engine). It starts the engine process,
sends it token ids over ZeroMQ and turns the token ids that come back into text, one
async iterator per request. It also watches the engine: a dead or stalled engine fails
every waiting request instead of leaving it hanging.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import pickle
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import zmq
import zmq.asyncio

from radixserve.config import ServerArgs
from radixserve.engine.detokenizer import IncrementalDetokenizer
from radixserve.engine.engine_process import HEARTBEAT_S, engine_main, prepare_engine_env
from radixserve.engine.io_struct import (
    AbortReq,
    BatchOutput,
    ControlReply,
    EngineFailed,
    EngineReady,
    EngineStats,
    FinishAbort,
    FinishReason,
    FinishStop,
    FlushCacheReq,
    LoadLoraReq,
    LoraReply,
    ProfileReq,
    ReqOutput,
    ShutdownReq,
    TokenizedEmbeddingReq,
    TokenizedGenerateReq,
    UnloadLoraReq,
    UpdateWeightsReq,
)
from radixserve.engine.lora import LoraError, resolve_lora_source
from radixserve.engine.sampling_params import SamplingParams
from radixserve.engine.tp_worker import local_ranks, start_rank_processes

logger = logging.getLogger(__name__)

TIMED_OUT = FinishAbort("request timed out")


class EngineError(RuntimeError):
    """The engine process died, stalled or could not start."""


@dataclass
class GenerateChunk:
    """One update of one request: cumulative text and ids, and what is new since the last."""

    rid: str
    text: str
    delta: str
    output_ids: list[int]
    new_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: FinishReason | None
    # per new token: (token_id, logprob, [(alt_id, alt_logprob), ...])
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    index: int = 0
    queue_time: float | None = None  # seconds waiting in the engine, on the first chunk
    # on the first chunk, when asked: per prompt token from logprob_start_len, as `logprobs`
    # (the logprob is None for the prompt's first token: nothing precedes it)
    prompt_logprobs: list[tuple[int, float | None, list[tuple[int, float]]]] | None = None

    def meta_info(self) -> dict:
        return {
            "id": self.rid,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "finish_reason": None if self.finish_reason is None else self.finish_reason.to_json(),
        }


class EngineClient:
    def __init__(self, args: ServerArgs) -> None:
        self.args = args
        self.info: EngineReady | None = None
        self.stats = EngineStats()
        self.detokenize_s = 0.0  # cumulative, for the offline bench's per-step profile
        self.tokenizer = None
        self.dead: str | None = None
        self.last_heartbeat = 0.0
        self._queues: dict[str, asyncio.Queue] = {}
        self._flush_waiters: list[asyncio.Future] = []
        self.lora_adapters: dict[str, str] = {}  # name -> source of the usable adapters
        self._control_waiters: dict[str, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []
        self._proc: mp.process.BaseProcess | None = None  # rank 0: scheduler and model
        self._ranks: list[mp.process.BaseProcess] = []  # this node's other tensor-parallel ranks

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> EngineReady:
        """Start the engine process and wait until its model is loaded."""
        if self.args.is_embedding and self.args.model_path is None:
            from radixserve.engine.embedding import default_embedding_model_path

            self.args.model_path = default_embedding_model_path()
        if self.args.node_rank > 0:
            raise EngineError(
                "--node-rank above 0 runs ranks only, with no front: start it with "
                "`radixserve serve --node-rank N`"
            )
        if self.args.tp_size > 1 and self.args.dist_init_addr is None:
            self.args.dist_init_addr = f"127.0.0.1:{_free_port()}"
        self._dir = tempfile.mkdtemp(prefix="radixserve-")
        to_engine = f"ipc://{os.path.join(self._dir, 'in')}"
        from_engine = f"ipc://{os.path.join(self._dir, 'out')}"
        self._ctx = zmq.asyncio.Context()
        self._send = self._ctx.socket(zmq.PUSH)
        # no high-water mark: a burst of aborts (thousands of sequences whose clients left)
        # queues instead of failing with EAGAIN and leaving those sequences running
        self._send.setsockopt(zmq.SNDHWM, 0)
        self._send.bind(to_engine)
        self._recv = self._ctx.socket(zmq.PULL)
        self._recv.bind(from_engine)
        prepare_engine_env()
        self._proc = mp.get_context("spawn").Process(
            target=engine_main,
            args=(self.args, to_engine, from_engine),
            daemon=True,
            name="radixserve-engine",
        )
        self._proc.start()
        self._ranks = start_rank_processes(self.args, local_ranks(self.args)[1:])
        tokenizer_task = asyncio.get_running_loop().run_in_executor(None, self._load_tokenizer)
        # retrieved even when the engine fails first (else asyncio logs a stray traceback)
        tokenizer_task.add_done_callback(lambda f: f.cancelled() or f.exception())
        # when another rank exits first, rank 0 usually reports the same failure, and better
        exited_at: float | None = None
        while True:
            if await self._recv.poll(500):
                msg = pickle.loads(await self._recv.recv())
                if isinstance(msg, EngineFailed):
                    self._proc.join(5)
                    self._kill_ranks()
                    raise EngineError(msg.error)
                if isinstance(msg, EngineReady):
                    self.info = msg
                    self.lora_adapters = dict(msg.lora_adapters or {})
                    break
            elif (why := self._exited()) is not None:
                exited_at = exited_at or time.monotonic()
                if not self._proc.is_alive() or time.monotonic() - exited_at > 5.0:
                    self._kill_ranks()
                    raise EngineError(f"{why} while loading")
        await tokenizer_task
        self.last_heartbeat = time.monotonic()
        self._tasks = [asyncio.create_task(self._recv_loop()), asyncio.create_task(self._watch())]
        return msg

    def _load_tokenizer(self) -> None:
        from radixserve.models.loader import gguf_parsed_once, load_tokenizer, resolve_model

        with gguf_parsed_once():  # the tokenizer, then the config for its chat template
            self.tokenizer = load_tokenizer(
                resolve_model(self.args.model_path), self.args.tokenizer_path
            )
        if self.args.chat_template:
            with open(self.args.chat_template) as f:
                self.tokenizer.chat_template = f.read()

    async def shutdown(self) -> None:
        if self._proc is None:
            return
        if self._proc.is_alive() and self.dead is None:  # a dead engine may never read it
            await self._send.send_pyobj(ShutdownReq())
            await asyncio.get_running_loop().run_in_executor(None, self._proc.join, 10)
        if self._proc.is_alive():
            self._proc.kill()
        for p in self._ranks:  # rank 0's shutdown released them
            await asyncio.get_running_loop().run_in_executor(None, p.join, 10)
        self._kill_ranks()
        for t in self._tasks:
            t.cancel()
        self._fail_all("engine shut down")
        self._send.close(linger=0)
        self._recv.close(linger=0)
        self._ctx.term()
        self._proc = None

    @property
    def healthy(self) -> bool:
        """Loaded, not dead, and the loop answered within a few heartbeats."""
        return (
            self.info is not None
            and self.dead is None
            and self._proc is not None
            and self._proc.is_alive()  # a killed engine is unhealthy now, not at the next watch
            and time.monotonic() - self.last_heartbeat < max(5 * HEARTBEAT_S, 5.0)
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def rank_pids(self) -> list[int]:
        """Process ids of this node's tensor-parallel ranks, rank 0 first."""
        return [p.pid for p in [self._proc, *self._ranks] if p is not None]

    def _exited(self) -> str | None:
        """Why the engine is gone, when any of this node's rank processes has exited."""
        for rank, p in enumerate([self._proc, *self._ranks]):
            if p is not None and not p.is_alive():
                who = "engine process" if rank == 0 else f"tensor-parallel rank {rank}"
                return f"{who} exited with code {p.exitcode}"
        return None

    def _kill_ranks(self) -> None:
        """A group that lost a rank cannot run a step: stop every rank still alive."""
        for p in [self._proc, *self._ranks]:
            if p is not None and p.is_alive():
                p.kill()

    # ---- engine messages ---------------------------------------------------------------
    async def _recv_loop(self) -> None:
        while True:
            msg = pickle.loads(await self._recv.recv())
            self.last_heartbeat = time.monotonic()
            if isinstance(msg, EngineFailed):
                self._die(msg.error)
                return
            assert isinstance(msg, BatchOutput)
            if msg.stats is not None:
                self.stats = msg.stats
            if msg.flushed is not None:
                for fut in self._flush_waiters:
                    if not fut.done():
                        fut.set_result(msg.flushed)
                self._flush_waiters.clear()
            for reply in msg.replies:
                fut = self._control_waiters.pop(reply.rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(reply)
            for out in msg.outputs:
                q = self._queues.get(out.rid)
                if q is not None:
                    q.put_nowait(out)

    async def _watch(self) -> None:
        while self.dead is None:
            await asyncio.sleep(HEARTBEAT_S)
            if self._proc is not None and (why := self._exited()) is not None:
                self._die(why)
            elif time.monotonic() - self.last_heartbeat > self.args.watchdog_timeout:
                self._die(f"engine made no progress for {self.args.watchdog_timeout:.0f}s")

    def _die(self, why: str) -> None:
        if self.dead is None:
            logger.error("engine failed: %s", why)
            self.dead = why
        self._fail_all(why)
        if self.args.tp_size > 1:
            self._kill_ranks()

    def _fail_all(self, why: str) -> None:
        for q in self._queues.values():
            q.put_nowait(EngineError(why))
        for fut in self._flush_waiters:
            if not fut.done():
                fut.set_exception(EngineError(why))
        self._flush_waiters.clear()
        for fut in self._control_waiters.values():
            if not fut.done():
                fut.set_exception(EngineError(why))
        self._control_waiters.clear()

    # ---- text ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def apply_chat_template(self, messages: list[dict], **kwargs) -> list[int]:
        """Token ids of a chat, generation prompt appended; kwargs reach the template."""
        kwargs.setdefault("add_generation_prompt", True)
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    # ---- requests ----------------------------------------------------------------------------
    def check_alive(self) -> None:
        if self.dead is not None:
            raise EngineError(self.dead)
        if self.info is None:
            raise EngineError("engine is not started")

    async def generate(
        self,
        input_ids: list[int],
        params: SamplingParams,
        *,
        rid: str | None = None,
        stream: bool = True,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        index: int = 0,
        deadline: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        logprob_start_len: int = -1,
        lora_name: str | None = None,
    ) -> AsyncIterator[GenerateChunk]:
        """Chunks of one sequence. Leaving the iterator early aborts it in the engine, and so
        does its `deadline` (time.monotonic()): the sequence then ends here at once with
        finish_reason abort, without waiting for an engine that may be busy or stalled."""
        self.check_alive()
        rid = rid or uuid.uuid4().hex
        if rid in self._queues:
            raise ValueError(f"request id {rid!r} is already in use")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        detok = IncrementalDetokenizer(
            self.tokenizer, params.skip_special_tokens, params.spaces_between_special_tokens
        )
        hold = max((len(s) for s in params.stop), default=1) - 1
        emitted = 0
        ids: list[int] = []
        finished = False
        engine_done = False
        last = ReqOutput(rid, [], len(input_ids), 0, 0)
        try:
            await self._send.send_pyobj(
                TokenizedGenerateReq(
                    rid,
                    input_ids,
                    params,
                    return_logprob,
                    top_logprobs_num,
                    stream,
                    priority,
                    cache_salt,
                    logprob_start_len,
                    lora_name,
                )
            )
            while not finished:
                out = await _get_before(q, deadline)
                if isinstance(out, Exception):
                    raise out
                if out is None:  # past the deadline: the engine is told in `finally`
                    out = replace(
                        last,
                        new_token_ids=[],
                        logprobs=None,
                        queue_time=None,
                        prompt_logprobs=None,
                        finish_reason=TIMED_OUT,
                    )
                else:
                    engine_done = out.finish_reason is not None
                out: ReqOutput
                last = out
                finished = out.finish_reason is not None
                ids.extend(out.new_token_ids)
                t0 = time.perf_counter()
                detok.add(out.new_token_ids)
                if finished:
                    detok.flush()
                text = detok.text
                self.detokenize_s += time.perf_counter() - t0
                fr = out.finish_reason
                if (
                    isinstance(fr, FinishStop)
                    and isinstance(fr.matched, str)
                    and fr.matched in text
                ):
                    text = text[: text.index(fr.matched)]
                visible = len(text) if finished else max(emitted, len(text) - hold)
                lps = []
                if out.logprobs:
                    lps = [
                        (t, lp, alts)
                        for t, (lp, alts) in zip(out.new_token_ids, out.logprobs, strict=False)
                    ]
                yield GenerateChunk(
                    rid=rid,
                    text=text[:visible],
                    delta=text[emitted:visible],
                    output_ids=list(ids),
                    new_ids=out.new_token_ids,
                    prompt_tokens=out.prompt_tokens,
                    completion_tokens=out.completion_tokens,
                    cached_tokens=out.cached_tokens,
                    finish_reason=out.finish_reason,
                    logprobs=lps,
                    index=index,
                    queue_time=out.queue_time,
                    prompt_logprobs=None
                    if out.prompt_logprobs is None
                    else [
                        (t, lp, alts)
                        for t, (lp, alts) in zip(
                            input_ids[logprob_start_len:], out.prompt_logprobs, strict=True
                        )
                    ],
                )
                emitted = visible
        finally:
            self._queues.pop(rid, None)
            if not engine_done and self.dead is None and self._proc is not None:
                self.abort(rid)

    def abort(self, rid: str) -> None:
        """Fire-and-forget: the engine frees the request's slots on its next loop."""

        def check(sent: asyncio.Future) -> None:
            if not sent.cancelled() and sent.exception() is not None:
                logger.warning("could not send abort for %s: %s", rid, sent.exception())

        try:
            self._send.send_pyobj(AbortReq(rid), flags=zmq.NOBLOCK).add_done_callback(check)
        except zmq.ZMQError as e:
            logger.warning("could not send abort for %s: %s", rid, e)

    async def generate_n(
        self, input_ids: list[int], params: SamplingParams, n: int, **kw
    ) -> list[AsyncIterator[GenerateChunk]]:
        """n sequences of one prompt; the later ones start once the first has prefilled,
        so they find the prompt in the prefix cache instead of computing it n times."""
        if n == 1:
            return [self.generate(input_ids, params, **kw)]
        rids = sequence_rids(kw.pop("rid", None) or uuid.uuid4().hex, 1, n)
        kw["stream"] = True  # the first chunk is the signal that the prompt is cached
        first = self.generate(input_ids, params, rid=rids[0], index=0, **kw)
        head = await anext(first)
        others = []
        for i in range(1, n):
            p = params if params.seed is None else _with_seed(params, params.seed + i)
            others.append(self.generate(input_ids, p, rid=rids[i], index=i, **kw))
        return [_prepend(head, first), *others]

    async def embed(self, input_ids: list[list[int]]) -> list[list[float]]:
        """One vector per token-id sequence (embedding engines only); ValueError for bad input."""
        self.check_alive()
        rid = uuid.uuid4().hex
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        try:
            await self._send.send_pyobj(TokenizedEmbeddingReq(rid, input_ids))
            out = await q.get()
        finally:
            self._queues.pop(rid, None)
        if isinstance(out, Exception):
            raise out
        if out.error is not None:
            raise ValueError(out.error)
        return out.embeddings

    async def load_lora(self, name: str, source: str) -> LoraReply:
        """Fetch the adapter where `source` is remote (in a thread: downloads never stall the
        engine or this loop), then have the engine load it."""
        known = self.lora_adapters.get(name)
        if known is not None:
            if known == source:
                return LoraReply("", True, f"adapter {name!r} is already loaded")
            return LoraReply("", False, f"adapter {name!r} is already loaded from {known!r}", 400)
        try:
            folder = await asyncio.to_thread(resolve_lora_source, source)
        except LoraError as e:
            return LoraReply("", False, str(e), e.status)
        return await self._lora_call(LoadLoraReq(uuid.uuid4().hex, name, source, folder))

    async def unload_lora(self, name: str) -> LoraReply:
        """Answered once the requests already using the adapter finished; new requests for
        it are refused from now on."""
        self.lora_adapters.pop(name, None)
        return await self._lora_call(UnloadLoraReq(uuid.uuid4().hex, name))

    async def _lora_call(self, msg: LoadLoraReq | UnloadLoraReq) -> LoraReply:
        self.check_alive()
        q: asyncio.Queue = asyncio.Queue()
        self._queues[msg.rid] = q
        try:
            await self._send.send_pyobj(msg)
            reply = await q.get()
        finally:
            del self._queues[msg.rid]
        if isinstance(reply, Exception):
            raise reply
        self.lora_adapters = dict(reply.adapters)
        return reply

    async def flush_cache(self) -> bool:
        self.check_alive()
        fut = asyncio.get_running_loop().create_future()
        self._flush_waiters.append(fut)
        await self._send.send_pyobj(FlushCacheReq())
        return await fut

    async def control(self, msg: UpdateWeightsReq | ProfileReq) -> ControlReply:
        """Send a control message and wait for the engine's reply (a weights update
        replies once the running requests have drained and the swap is done)."""
        self.check_alive()
        fut = asyncio.get_running_loop().create_future()
        self._control_waiters[msg.rid] = fut
        try:
            await self._send.send_pyobj(msg)
            return await fut
        finally:
            self._control_waiters.pop(msg.rid, None)


def sequence_rids(rid: str, num_prompts: int, n: int) -> list[str]:
    """The engine ids of a request's sequences, in choice order (prompt by prompt, n each):
    the request's own id for a single sequence, else `rid-p<prompt>` for each of several
    prompts and `-<sample>` for each of n > 1. The one naming rule: owned_by undoes it."""
    prompts = [rid] if num_prompts == 1 else [f"{rid}-p{j}" for j in range(num_prompts)]
    return [p if n == 1 else f"{p}-{i}" for p in prompts for i in range(n)]


def owned_by(engine_rid: str, rid: str) -> bool:
    """Whether `engine_rid` is `rid` or one of its sequences (SGLang's abort by prefix)."""
    return engine_rid == rid or engine_rid.startswith(f"{rid}-")


async def _get_before(q: asyncio.Queue, deadline: float | None):
    """The queue's next item, or None once `deadline` has passed (even with items waiting:
    a slow reader must not keep a timed-out sequence alive)."""
    if deadline is None:
        return await q.get()
    left = deadline - time.monotonic()
    if left <= 0:
        return None
    try:
        async with asyncio.timeout(left):
            return await q.get()
    except TimeoutError:
        return None


def _free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago, for the single-node rank rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return replace(params, seed=seed)


async def _prepend(
    head: GenerateChunk, rest: AsyncIterator[GenerateChunk]
) -> AsyncIterator[GenerateChunk]:
    try:
        yield head
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()
