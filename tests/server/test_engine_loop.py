"""The engine loop (engine_process.serve) that drives both the scheduler and the embedding
worker: requests reach the worker, every step's outputs and a flush's answer come back in
one BatchOutput, an idle loop still sends (the heartbeat), a failed step reports
EngineFailed before it raises, and ShutdownReq stops it. A fake worker over inproc
sockets: no model."""

from __future__ import annotations

import os
import pickle
import threading

import pytest
import zmq
from radixserve.engine.engine_process import HEARTBEAT_S, serve
from radixserve.engine.io_struct import (
    AbortReq,
    BatchOutput,
    EngineFailed,
    EngineStats,
    FlushCacheReq,
    ShutdownReq,
)


class FakeWorker:
    def __init__(self, fail_step: bool = False) -> None:
        self.stats = EngineStats()
        self.pending: list[str] = []
        self.received: list[object] = []
        self.idles = 0
        self.shut = False
        self.fail_step = fail_step

    def receive(self, msg: object) -> None:
        self.received.append(msg)
        if isinstance(msg, str):
            self.pending.append(msg)

    def flush_cache(self) -> bool:
        return False

    def has_work(self) -> bool:
        return bool(self.pending)

    def step(self) -> list:
        if self.fail_step:
            raise RuntimeError("boom")
        done, self.pending = self.pending, []
        self.stats.forward_steps += 1
        return [f"out:{m}" for m in done]

    def idle(self) -> None:
        self.idles += 1

    def shutdown(self) -> None:
        self.shut = True


@pytest.fixture
def loop():
    """Starts serve() on a thread for a worker: (to the engine, from it, the thread, its errors)."""
    ctx = zmq.Context()
    started = []

    def start(worker: FakeWorker):
        to_engine, from_engine = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        to_engine.bind("inproc://to-engine")
        from_engine.bind("inproc://from-engine")
        recv, send = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        recv.connect("inproc://to-engine")
        send.connect("inproc://from-engine")
        errors: list[BaseException] = []

        def run() -> None:
            try:
                serve(worker, recv, send, os.getppid())
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        started.append((to_engine, thread))
        return to_engine, from_engine, thread, errors

    yield start
    for to_engine, thread in started:
        if thread.is_alive():
            to_engine.send(pickle.dumps(ShutdownReq()))
            thread.join(5)
    ctx.destroy(linger=0)


def next_msg(sock: zmq.Socket, timeout_s: float = 5.0):
    assert sock.poll(int(timeout_s * 1000)), "the loop sent nothing"
    return pickle.loads(sock.recv())


def test_requests_outputs_flush_heartbeat_and_shutdown(loop):
    worker = FakeWorker()
    to_engine, from_engine, thread, errors = loop(worker)
    # idle: a BatchOutput still comes within the heartbeat, after an idle tick
    idle = next_msg(from_engine, 5 * HEARTBEAT_S)
    assert isinstance(idle, BatchOutput) and idle.outputs == [] and idle.flushed is None
    assert worker.idles >= 1
    to_engine.send(pickle.dumps("a"))
    to_engine.send(pickle.dumps(AbortReq("x")))
    to_engine.send(pickle.dumps(FlushCacheReq()))
    got: list = []
    flushed = None
    for _ in range(20):  # a few heartbeats at most
        if got and flushed is not None:
            break
        msg = next_msg(from_engine)
        got += msg.outputs
        flushed = msg.flushed if msg.flushed is not None else flushed
        assert isinstance(msg.stats, EngineStats)
    assert got == ["out:a"]
    assert flushed is False  # the worker's answer, not a default
    assert any(isinstance(m, AbortReq) and m.rid == "x" for m in worker.received)
    assert not any(isinstance(m, FlushCacheReq | ShutdownReq) for m in worker.received)
    to_engine.send(pickle.dumps(ShutdownReq()))
    thread.join(5)
    assert not thread.is_alive() and worker.shut and not errors


def test_failed_step_reports_then_raises(loop):
    worker = FakeWorker(fail_step=True)
    to_engine, from_engine, thread, errors = loop(worker)
    to_engine.send(pickle.dumps("a"))
    for _ in range(20):
        if isinstance(msg := next_msg(from_engine), EngineFailed):
            break
        assert isinstance(msg, BatchOutput)
    assert "boom" in msg.error
    thread.join(5)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
