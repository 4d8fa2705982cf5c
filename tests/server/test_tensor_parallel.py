"""Tensor parallelism changes where the work runs, never the tokens.

Float32 on the CPU (gloo): greedy tokens with the model split over two engine processes
equal those of one process, on the default model (9 heads / 3 KV heads: an uneven 2 + 1
split of the KV heads) and on a tiny random Qwen3 with one KV head (replicated on both
ranks), also with the two ranks started as two "nodes" on 127.0.0.1. A rank that dies
makes the engine unhealthy and fails the requests in flight; impossible splits are refused
before any weights load.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from radixserve.config import ServerArgs
from radixserve.engine.client import EngineError
from radixserve.engine.engine import Engine
from radixserve.engine.engine_process import eos_token_ids
from radixserve.engine.io_struct import TokenizedGenerateReq
from radixserve.engine.model_runner import ModelRunner
from radixserve.engine.sampling_params import SamplingParams
from radixserve.engine.scheduler import Scheduler
from radixserve.layers.parallel import shard_heads, split_range
from radixserve.models.loader import load_tokenizer, resolve_model
from tiny_models import tiny_qwen3

pytestmark = pytest.mark.slow

NEW_TOKENS = 16
COMMON = dict(dtype="float32", device="cpu", max_total_tokens=2048, watchdog_timeout=60.0)


def greedy_tp1(model_path: str | None, prompts: list[list[int]]) -> list[list[int]]:
    """The reference: one process, the scheduler in-process."""
    args = ServerArgs(model_path=model_path, **COMMON)
    runner = ModelRunner(args)
    tok = load_tokenizer(runner.source)
    sched = Scheduler(args, runner, tok, eos_token_ids(runner.config, tok, runner.source.folder))
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    for i, ids in enumerate(prompts):
        sched.add_request(TokenizedGenerateReq(f"r{i}", ids, params))
    out: dict[str, list[int]] = {}
    while sched.has_work():
        for o in sched.step():
            out.setdefault(o.rid, []).extend(o.new_token_ids)
    return [out[f"r{i}"] for i in range(len(prompts))]


def greedy(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    params = {"temperature": 0.0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    return [r["output_ids"] for r in engine.generate(input_ids=prompts, sampling_params=params)]


def chat_prompts(model_path: str | None) -> list[list[int]]:
    tok = load_tokenizer(resolve_model(model_path))
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "Hi"]
    out = []
    for q in questions:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
        )
        out.append(list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids))
    return out


def tiny_qwen3_with_tokenizer(path: str, heads: int, kv_heads: int) -> str:
    """A random Qwen3 with a real tokenizer beside it (for the front); odd vocabulary size
    so the vocabulary split is uneven too."""
    return tiny_qwen3(
        path,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=32,
        hidden_size=64,
        intermediate_size=96,
        vocab_size=321,
        max_position_embeddings=256,
        with_tokenizer=True,
    )


TINY_PROMPTS = [[1, 5, 9, 30, 200, 17, 4], [7, 8, 9], list(range(40, 100))]


@pytest.fixture(scope="module")
def qwen3_one_kv_head(tmp_path_factory) -> str:
    return tiny_qwen3_with_tokenizer(str(tmp_path_factory.mktemp("qwen3-1kv")), heads=4, kv_heads=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, what: str, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.2)


# ---- how heads split --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "heads,kv_heads,size", [(9, 3, 1), (9, 3, 2), (9, 3, 3), (9, 3, 9), (4, 1, 2), (32, 8, 6)]
)
def test_every_head_on_exactly_one_rank_with_its_kv_head(heads, kv_heads, size):
    group = heads // kv_heads
    seen: list[int] = []
    for rank in range(size):
        q, kv = shard_heads(heads, kv_heads, size, rank)
        assert len(q) >= 1 and len(kv) >= 1
        assert len(q) % len(kv) == 0  # uniform GQA on the rank, as the kernels need
        assert {h // group for h in q} == set(kv)
        seen += list(q)
    assert seen == list(range(heads))


@pytest.mark.parametrize(
    "heads,kv_heads,size,why",
    [(9, 3, 4, "multiple of 3"), (9, 3, 10, "more than the model's 9 attention heads")],
)
def test_impossible_splits_say_why(heads, kv_heads, size, why):
    with pytest.raises(ValueError, match=why):
        shard_heads(heads, kv_heads, size, 0)


def test_split_range_covers_everything_once():
    for n, parts in [(49152, 2), (321, 2), (7, 3), (3, 3)]:
        ranges = [split_range(n, parts, i) for i in range(parts)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1


def test_multi_node_flags_checked():
    with pytest.raises(ValueError, match="does not split over --nnodes 2"):
        ServerArgs(tp_size=3, nnodes=2, dist_init_addr="127.0.0.1:5000")
    with pytest.raises(ValueError, match="needs --dist-init-addr"):
        ServerArgs(tp_size=2, nnodes=2)
    with pytest.raises(ValueError, match="--node-rank must be between 0 and 1"):
        ServerArgs(tp_size=2, nnodes=2, node_rank=2, dist_init_addr="127.0.0.1:5000")
    with pytest.raises(ValueError, match="not host:port"):
        ServerArgs(tp_size=2, dist_init_addr="127.0.0.1")


def test_bad_tp_size_refused_before_loading():
    """9 heads / 3 KV heads cannot go on 4 ranks: refused from the config alone."""
    with pytest.raises(ValueError, match="--tp-size 4 does not fit the model's 3 KV heads"):
        ModelRunner(ServerArgs(tp_size=4, dist_init_addr="127.0.0.1:1", **COMMON))


def test_bad_tp_size_refused_at_start(tmp_path):
    """Through the front: the engine's reason comes back as the start's EngineError."""
    path = tiny_qwen3_with_tokenizer(str(tmp_path / "one-head"), heads=1, kv_heads=1)
    with pytest.raises(EngineError, match="more than the model's 1 attention heads"):
        Engine(path, tp_size=2, **COMMON)


# ---- same tokens -----------------------------------------------------------------------------
def test_tp2_default_model_same_greedy_tokens_and_dead_rank_fails_requests():
    prompts = chat_prompts(None)
    expected = greedy_tp1(None, prompts)
    engine = Engine(None, tp_size=2, **COMMON)
    try:
        assert greedy(engine, prompts) == expected
        # a rank dies in the middle of a request: the request fails, the engine is unhealthy
        stream = engine.generate(
            input_ids=prompts[0],
            sampling_params={"max_new_tokens": 10000, "ignore_eos": True},
            stream=True,
        )
        next(stream)
        assert engine.client.healthy
        os.kill(engine.client.rank_pids[1], signal.SIGKILL)
        # told by the front's watch on the rank's process, or by rank 0's failed collective
        with pytest.raises(EngineError):
            for _ in stream:
                pass
        assert not engine.client.healthy
        with pytest.raises(EngineError):
            greedy(engine, prompts[:1])
    finally:
        engine.shutdown()


def test_tp2_fewer_kv_heads_than_ranks_same_greedy_tokens(qwen3_one_kv_head):
    expected = greedy_tp1(qwen3_one_kv_head, TINY_PROMPTS)
    with Engine(qwen3_one_kv_head, tp_size=2, **COMMON) as engine:
        assert greedy(engine, TINY_PROMPTS) == expected


def test_two_nodes_on_localhost(qwen3_one_kv_head):
    """Node 1 is `radixserve serve --node-rank 1`: it joins, runs forward steps, and stops
    when node 0 does; node 0 loses node 1, and its engine turns unhealthy."""
    expected = greedy_tp1(qwen3_one_kv_head, TINY_PROMPTS)
    addr = f"127.0.0.1:{free_port()}"
    flags = ["--model", qwen3_one_kv_head, "--tp-size", "2", "--nnodes", "2"]
    flags += ["--dist-init-addr", addr, "--dtype", "float32", "--device", "cpu"]
    flags += ["--max-total-tokens", "2048", "--watchdog-timeout", "60"]
    node_args = dict(COMMON, tp_size=2, nnodes=2, node_rank=0, dist_init_addr=addr)

    def start_node1() -> subprocess.Popen:
        cmd = [sys.executable, "-m", "radixserve.cli", "serve", *flags, "--node-rank", "1"]
        return subprocess.Popen(cmd, start_new_session=True)

    node1 = start_node1()
    try:
        with Engine(qwen3_one_kv_head, **node_args) as engine:
            assert greedy(engine, TINY_PROMPTS) == expected
        assert node1.wait(60) == 0  # node 0's shutdown released it

        node1 = start_node1()
        engine = Engine(qwen3_one_kv_head, **node_args)
        try:
            assert greedy(engine, TINY_PROMPTS[:1]) == expected[:1]
            os.killpg(node1.pid, signal.SIGKILL)  # the whole node goes away
            wait_until(lambda: not engine.client.healthy, "node 0 to notice node 1 is gone")
            with pytest.raises(EngineError):
                greedy(engine, TINY_PROMPTS[:1])
        finally:
            engine.shutdown()
    finally:
        if node1.poll() is None:
            os.killpg(node1.pid, signal.SIGKILL)
            node1.wait()
