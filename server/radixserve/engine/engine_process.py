"""The engine process: receive requests, step the scheduler, send tokens back.

It owns the model and the KV cache; the front (HTTP or offline Engine) owns text. The loop
blocks on its socket only when idle, and then at most HEARTBEAT_S, so the front always
hears from a live engine within that time. One loop (`serve`) drives either worker: the
scheduler for generation, or embedding.EmbeddingWorker with `--is-embedding`.
"""

from __future__ import annotations

import logging
import os
import pickle
import traceback
from typing import Protocol

import torch
import zmq

from radixserve.config import ServerArgs
from radixserve.engine.control import EngineControl
from radixserve.engine.io_struct import (
    AbortReq,
    BatchOutput,
    EngineFailed,
    EngineReady,
    EngineStats,
    FlushCacheReq,
    LoadLoraReq,
    ProfileReq,
    ShutdownReq,
    TokenizedGenerateReq,
    UnloadLoraReq,
    UpdateWeightsReq,
)
from radixserve.models import stop_tokens

HEARTBEAT_S = 0.5
logger = logging.getLogger("radixserve.engine")


def eos_token_ids(config, tokenizer, folder: str) -> list[int]:
    """Every id that ends generation: config, generation_config and the tokenizer's eos."""
    ids: set[int] = set()

    def add(v):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list | tuple):
            ids.update(x for x in v if isinstance(x, int))

    add(getattr(config, "eos_token_id", None))
    add(tokenizer.eos_token_id)
    for token in stop_tokens(config):  # e.g. Gemma's <end_of_turn>
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id != tokenizer.unk_token_id:
            add(token_id)
    try:
        from transformers import GenerationConfig

        add(GenerationConfig.from_pretrained(folder).eos_token_id)
    except (OSError, ValueError):
        pass
    return sorted(ids)


class Worker(Protocol):
    """What the engine loop drives: the scheduler (GenerationWorker) or, with
    `--is-embedding`, embedding.EmbeddingWorker. The loop owns the sockets, the heartbeat
    and the exits; a worker only handles messages and steps."""

    ready: EngineReady

    @property
    def stats(self) -> EngineStats: ...

    def receive(self, msg: object) -> None:
        """A request or an abort."""

    def flush_cache(self) -> bool: ...

    def has_work(self) -> bool: ...

    def step(self) -> list: ...

    def idle(self) -> None:
        """Called instead of step when there is no work."""

    def shutdown(self) -> None: ...


class GenerationWorker:
    """The model runner and the scheduler: continuous batching of generate requests."""

    def __init__(self, args: ServerArgs) -> None:
        from radixserve.engine.model_runner import ModelRunner
        from radixserve.engine.scheduler import Scheduler
        from radixserve.models.loader import gguf_parsed_once, load_tokenizer

        with gguf_parsed_once():
            self.runner = runner = ModelRunner(args)
            tokenizer = load_tokenizer(runner.source, args.tokenizer_path)
            eos = eos_token_ids(runner.config, tokenizer, runner.source.folder)
            self.scheduler = Scheduler(args, runner, tokenizer, eos)
        self.ready = EngineReady(
            model_path=runner.source.path,
            context_length=runner.context_length,
            vocab_size=runner.vocab_size,
            max_total_tokens=runner.max_total_tokens,
            max_running_requests=args.max_running_requests,
            dtype=str(runner.dtype).removeprefix("torch."),
            device=runner.device,
            attention_backend=runner.backend_name,
            eos_token_ids=eos,
            quantization=runner.quantization,
            cpu_path=runner.cpu_path.to_dict() if runner.cpu_path else None,
            lora_adapters=runner.lora.loaded() if runner.lora is not None else None,
            speculative=self.scheduler.spec.describe(args) if self.scheduler.spec else None,
        )

    @property
    def stats(self) -> EngineStats:
        return self.scheduler.stats

    def receive(self, msg: object) -> None:
        if isinstance(msg, TokenizedGenerateReq):
            self.scheduler.add_request(msg)
        elif isinstance(msg, AbortReq):
            self.scheduler.abort(msg.rid)
        elif isinstance(msg, LoadLoraReq | UnloadLoraReq):
            self.scheduler.lora_request(msg)

    def flush_cache(self) -> bool:
        return self.scheduler.flush_cache()

    def update_weights(self, model_path: str) -> str:
        """New weights, same architecture; called with no request running. The prefix
        cache is dropped: its KV was computed by the old weights."""
        path = self.runner.reload_weights(model_path)
        self.scheduler.flush_cache()
        self.ready.model_path = path
        return path

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list:
        return self.scheduler.step()

    def idle(self) -> None:
        self.runner.heartbeat()  # tensor parallel: the other ranks hear rank 0 is alive

    def shutdown(self) -> None:
        self.runner.shutdown()


def run_engine_process(args: ServerArgs, in_addr: str, out_addr: str) -> None:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s engine %(levelname)s %(message)s"
    )
    ctx = zmq.Context()
    recv = ctx.socket(zmq.PULL)
    recv.connect(in_addr)
    send = ctx.socket(zmq.PUSH)
    send.connect(out_addr)
    parent = os.getppid()
    try:
        if args.is_embedding:
            from radixserve.engine.embedding import EmbeddingWorker

            worker: Worker = EmbeddingWorker(args)
        else:
            worker = GenerationWorker(args)
    except Exception as e:
        logger.error("engine failed to start: %s", e)
        send.send_pyobj(
            EngineFailed(f"{type(e).__name__}: {e}" if not str(e).startswith("/") else str(e))
        )
        send.close(linger=2000)
        return
    send.send_pyobj(worker.ready)
    serve(worker, recv, send, parent)


def serve(worker: Worker, recv: zmq.Socket, send: zmq.Socket, parent: int) -> None:
    """The loop: drain the socket (waiting at most HEARTBEAT_S when idle), step, send one
    BatchOutput with the step's outputs and the stats; until ShutdownReq, or until the
    front process `parent` is gone."""
    poller = zmq.Poller()
    poller.register(recv, zmq.POLLIN)
    control = EngineControl(worker)
    while True:
        timeout = 0 if worker.has_work() else HEARTBEAT_S * 1000
        flushed = None
        replies = []
        while poller.poll(timeout):
            msg = pickle.loads(recv.recv())
            timeout = 0
            if isinstance(msg, FlushCacheReq):
                flushed = worker.flush_cache()
            elif isinstance(msg, ProfileReq):
                replies.append(control.profile(msg))
            elif isinstance(msg, UpdateWeightsReq):
                if (refused := control.request_update(msg)) is not None:
                    replies.append(refused)
            elif control.holds(msg):
                pass
            elif isinstance(msg, ShutdownReq):
                logger.info("engine shutting down")
                worker.shutdown()
                send.close(linger=1000)
                return
            else:
                worker.receive(msg)
        if os.getppid() != parent:
            logger.error("front process is gone; engine exits")
            return
        if (swapped := control.swap_if_drained()) is not None:
            replies.append(swapped)
        try:
            if worker.has_work():
                outputs = worker.step()
            else:
                outputs = []
                worker.idle()
        except Exception:
            logger.error("engine step failed:\n%s", traceback.format_exc())
            send.send_pyobj(EngineFailed("engine step failed: " + traceback.format_exc(limit=3)))
            raise
        send.send_pyobj(BatchOutput(outputs, worker.stats, flushed, replies))


def prepare_engine_env() -> None:
    """Set before an engine process spawns (OpenMP reads it once, at load): idle OpenMP
    threads spin only briefly, then sleep. The engine shares the cores with the HTTP
    process; threads that spin for long (libgomp's default) lose their core to it and stall
    every parallel region, while threads that sleep at once (PASSIVE) pay a wake-up for each
    of the hundreds of small operations in a decode step. Measured on 2 cores, served,
    2 engine threads: single stream 51 tok/s sleeping at once, 111 with a 2,000-spin wait;
    concurrency 32: 269 and 374. A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "2000")


def engine_main(args: ServerArgs, in_addr: str, out_addr: str) -> None:
    """Process entry point: keep torch to the cores we were given (shared by this node's ranks)."""
    local_ranks = args.tp_size // args.nnodes
    threads = args.cpu_threads or len(os.sched_getaffinity(0)) // local_ranks
    torch.set_num_threads(max(1, threads))
    run_engine_process(args, in_addr, out_addr)
