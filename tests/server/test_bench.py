"""`radixserve bench`: dataset reading, request shaping, metric arithmetic, and one short run
against a real server (the transformers baseline) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web
from radixserve.bench import build_parser, make_requests
from radixserve.bench import main as bench_main
from radixserve.bench.backends import _Timer, send_radixserve
from radixserve.bench.datasets import (
    BenchRequest,
    iter_json_array,
    load_sharegpt_pairs,
    load_tokenizer,
    sample_generated_shared_prefix,
    sample_grounded,
    sample_random,
    sample_sharegpt,
    sharegpt_path,
)
from radixserve.bench.metrics import RequestResult, compute_metrics, format_table
from radixserve.bench.serving import run_benchmark

ROOT = Path(__file__).resolve().parents[2]


class WordTokenizer:
    """One token per whitespace-separated word: lengths in tests are then obvious."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [len(w) for w in text.split()]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def convo(prompt: str, reply: str) -> dict:
    return {
        "id": "x",
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}],
    }


# --- datasets ---------------------------------------------------------------------------


def test_iter_json_array_stops_at_torn_tail():
    torn = '[\n  {"a": 1},\n  {"b": [2, "x]"]},\n  {"c": "cut in the mid'
    assert list(iter_json_array(torn)) == [{"a": 1}, {"b": [2, "x]"]}]
    assert list(iter_json_array("[1, 2, 3]")) == [1, 2, 3]
    assert list(iter_json_array("[]")) == []


def test_packaged_sharegpt_is_torn_and_its_complete_records_load():
    path = sharegpt_path()
    with path.open("rb") as f:
        f.seek(-200, 2)
        tail = f.read().rstrip()
    assert not tail.endswith(b"]"), "the packaged file is expected to be cut off"
    pairs = load_sharegpt_pairs(path)
    assert len(pairs) > 10_000
    assert all(isinstance(p, str) and isinstance(r, str) for p, r in pairs[-100:])


def test_sharegpt_filters_and_lengths(tmp_path):
    records = [
        convo(words(10), words(20)),  # kept
        convo(words(3), words(20)),  # prompt under 4 tokens
        convo(words(10), words(3)),  # reply under 4 tokens
        convo(words(1025), words(10)),  # prompt over 1024
        convo(words(1000), words(1049)),  # prompt + reply over 2048
        {"id": "y", "conversations": [{"from": "human", "value": words(8)}]},  # one turn
        convo(words(4), words(4)),  # kept: the bounds are inclusive
        convo(words(1024), words(1024)),  # kept
    ]
    text = json.dumps(records, indent=1)
    path = tmp_path / "sharegpt.json"
    path.write_text(text + ',\n {"id": "torn", "conversations": [{"from": "hu')
    tok = WordTokenizer()

    got = sample_sharegpt(3, tok, path=path, seed=0)
    assert sorted((r.prompt_len, r.output_len) for r in got) == [(4, 4), (10, 20), (1024, 1024)]
    capped = sample_sharegpt(3, tok, path=path, max_output_len=16)
    assert sorted(r.output_len for r in capped) == [4, 16, 16]
    fixed = sample_sharegpt(3, tok, path=path, fixed_output_len=7)
    assert {r.output_len for r in fixed} == {7}
    with pytest.raises(ValueError, match="only 3 usable"):
        sample_sharegpt(4, tok, path=path)


def test_grounded_prompts_carry_their_passage_and_ask_for_it_back(tmp_path):
    records = [convo(words(5), words(100)), convo(words(5), words(30)), convo(words(5), words(900))]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(records))
    tok = WordTokenizer()
    (got,) = sample_grounded(1, tok, path=path, max_output_len=64)  # 30 and 900 words are out
    assert got.prompt.startswith("Passage:\n" + words(100))
    assert got.output_len == 64 and got.prompt_len > 100
    with pytest.raises(ValueError, match="only 1 usable"):
        sample_grounded(2, tok, path=path)


def test_sharegpt_sample_is_seeded(tokenizer):
    a = sample_sharegpt(5, tokenizer, seed=3)
    b = sample_sharegpt(5, tokenizer, seed=3)
    c = sample_sharegpt(5, tokenizer, seed=4)
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert [r.prompt for r in a] != [r.prompt for r in c]
    for r in a:
        assert r.prompt_len == len(tokenizer.encode(r.prompt, add_special_tokens=False))


def test_random_lengths(tokenizer):
    fixed = sample_random(6, tokenizer, input_len=40, output_len=9, range_ratio=1.0, seed=1)
    assert [r.output_len for r in fixed] == [9] * 6
    for r in fixed:
        assert abs(r.prompt_len - 40) <= 3
        assert r.prompt_len == len(tokenizer.encode(r.prompt, add_special_tokens=False))

    ranged = sample_random(40, tokenizer, input_len=30, output_len=20, range_ratio=0.5, seed=1)
    outs = [r.output_len for r in ranged]
    assert all(10 <= n <= 20 for n in outs)
    assert len(set(outs)) > 3
    assert all(r.prompt_len <= 33 for r in ranged)


def test_shared_prefix_groups_share_their_system_prompt(tokenizer):
    groups, per_group, sys_len = 3, 4, 60
    reqs = sample_generated_shared_prefix(
        tokenizer,
        num_groups=groups,
        prompts_per_group=per_group,
        system_prompt_len=sys_len,
        question_len=10,
        output_len=5,
        seed=2,
    )
    assert len(reqs) == groups * per_group
    assert len({r.prompt for r in reqs}) == len(reqs)
    assert {r.output_len for r in reqs} == {5}

    ids = [tokenizer.encode(r.prompt, add_special_tokens=False) for r in reqs]
    head = sys_len // 2
    by_head: dict[tuple, list[list[int]]] = {}
    for seq in ids:
        by_head.setdefault(tuple(seq[:head]), []).append(seq)
    assert sorted(len(v) for v in by_head.values()) == [per_group] * groups

    def common(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    for members in by_head.values():
        for other in members[1:]:
            assert common(members[0], other) >= sys_len - 2
    # the shuffle interleaves groups rather than sending each group back to back
    order = [next(k for k, v in by_head.items() if seq in v) for seq in ids]
    assert any(order[i] != order[i + 1] for i in range(per_group - 1))


def test_dataset_flags_reach_their_sampler(tokenizer):
    """make_requests hands each dataset its own --random-* / --gsp-* flags, by name."""
    argv = ["--seed", "3", "--num-prompts", "5", "--dataset-name", "random"]
    flags = ["--random-input-len", "30", "--random-output-len", "7", "--random-range-ratio", "1"]
    got = make_requests(build_parser().parse_args(argv + flags), tokenizer)
    want = sample_random(5, tokenizer, input_len=30, output_len=7, range_ratio=1.0, seed=3)
    assert [(r.prompt, r.output_len) for r in got] == [(r.prompt, r.output_len) for r in want]
    argv = ["--seed", "3", "--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "2"]
    flags = ["--gsp-prompts-per-group", "3", "--gsp-system-prompt-len", "20"]
    flags += ["--gsp-question-len", "5", "--gsp-output-len", "4"]
    got = make_requests(build_parser().parse_args(argv + flags), tokenizer)
    want = sample_generated_shared_prefix(
        tokenizer, num_groups=2, prompts_per_group=3, system_prompt_len=20, question_len=5,
        output_len=4, seed=3,
    )  # fmt: skip
    assert len(got) == 6 and {r.output_len for r in got} == {4}
    assert [r.prompt for r in got] == [r.prompt for r in want]


# --- metrics ----------------------------------------------------------------------------


def test_metrics_on_crafted_timings():
    results = [
        RequestResult(True, 10, 5, "", ttft=0.1, latency=0.5, itl=[0.1, 0.1, 0.1, 0.1]),
        RequestResult(True, 20, 3, "", ttft=0.3, latency=0.9, itl=[0.2, 0.4]),
        RequestResult(True, 30, 1, "", ttft=0.2, latency=0.2, itl=[]),
        RequestResult(False, 40, 0, "", error="HTTP 500"),
    ]
    m = compute_metrics(results, duration_s=2.0)
    assert (m.completed, m.failed) == (3, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (60, 9)
    assert m.request_throughput == pytest.approx(1.5)
    assert m.input_throughput == pytest.approx(30.0)
    assert m.output_throughput == pytest.approx(4.5)
    assert m.total_throughput == pytest.approx(34.5)
    assert m.concurrency == pytest.approx((0.5 + 0.9 + 0.2) / 2.0)

    assert m.ttft_ms.mean == pytest.approx(200.0)
    assert m.ttft_ms.median == pytest.approx(200.0)
    assert m.ttft_ms.p99 == pytest.approx(200.0 + 0.98 * 100.0)
    # TPOT: (0.5 - 0.1) / 4 and (0.9 - 0.3) / 2; the one-token request has no decode phase
    assert m.tpot_ms.mean == pytest.approx((100.0 + 300.0) / 2)
    assert m.tpot_ms.median == pytest.approx(200.0)
    # ITL pools every gap of every request: 100 x4, 200, 400
    assert m.itl_ms.mean == pytest.approx(1000.0 / 6)
    assert m.itl_ms.median == pytest.approx(100.0)
    assert m.itl_ms.p99 == pytest.approx(200.0 + 0.95 * 200.0)
    assert m.itl_ms.max == pytest.approx(400.0)
    assert m.e2e_latency_ms.median == pytest.approx(500.0)

    table = format_table(m)
    assert "Successful requests:" in table and "Median TTFT (ms):" in table


def test_metrics_with_no_success_do_not_divide_by_zero():
    m = compute_metrics([RequestResult(False, 5, 0, error="x")], duration_s=1.0)
    assert (m.completed, m.failed, m.output_throughput, m.ttft_ms.mean) == (0, 1, 0.0, 0.0)


def test_timer_spreads_a_coalesced_chunk_over_its_tokens():
    result = RequestResult()
    timer = _Timer(result, start=10.0)
    timer.tokens(10.5)  # first token
    timer.tokens(10.7)
    timer.tokens(11.3, count=3)  # three tokens arrived together
    timer.tokens(11.4, count=0)  # a chunk without new tokens changes nothing
    assert result.ttft == pytest.approx(0.5)
    assert result.itl == pytest.approx([0.2, 0.2, 0.2, 0.2])


# --- request shaping, against a scripted native /generate stream --------------------------


async def test_radixserve_backend_request_and_stream_parsing():
    seen: dict = {}

    async def generate(request: web.Request) -> web.StreamResponse:
        seen.update(await request.json())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for text, count in (("He", 1), ("Hello wor", 3), ("Hello world", 4)):
            event = {"text": text, "meta_info": {"completion_tokens": count}}
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/generate", generate)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            req = BenchRequest("Say hello", prompt_len=3, output_len=4)
            result = await send_radixserve(session, f"http://127.0.0.1:{port}", req, None, True, {})
    finally:
        await runner.cleanup()

    assert seen == {
        "text": "Say hello",
        "sampling_params": {"max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True},
        "stream": True,
    }
    assert result.success, result.error
    assert (result.output_len, result.generated_text, result.prompt_len) == (4, "Hello world", 3)
    assert len(result.itl) == 3  # one gap per token after the first
    assert result.itl[0] == result.itl[1]  # the 2-token chunk's gap is split evenly
    assert 0 < result.ttft <= result.latency


async def test_max_duration_reports_the_finished_requests_only():
    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if body["text"] == "hang":
            await asyncio.sleep(3600)
        for count in (1, 2):
            event = {"text": "ab"[:count], "meta_info": {"completion_tokens": count}}
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/generate", generate)
    # cancel the hanging handler when the client gives up, so cleanup does not wait for it
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    requests = [BenchRequest("hang", 1, 2), BenchRequest("quick", 1, 2)] * 2
    try:
        metrics, results = await run_benchmark(
            backend="radixserve",
            base_url=f"http://127.0.0.1:{port}",
            requests=requests,
            count_tokens=len,
            max_duration=1.0,
            progress=False,
        )
    finally:
        await runner.cleanup()
    assert len(results) == 2
    assert (metrics.completed, metrics.failed, metrics.total_output_tokens) == (2, 0, 4)


# --- end to end against a real server ---------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hf_server():
    """bench/peers/hf_server.py (the transformers baseline) under uvicorn, on 127.0.0.1."""
    port = _free_port()
    env = os.environ | {"PYTHONPATH": str(ROOT / "server")}
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "peers" / "hf_server.py"),
        "--port",
        str(port),
        "--max-batch-size",
        "4",
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"hf_server exited: {proc.stdout.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("hf_server did not become healthy")
                time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_end_to_end_against_a_real_server(hf_server, tmp_path):
    out = tmp_path / "results.jsonl"
    argv = [
        "--backend", "openai",
        "--port", str(hf_server),
        "--dataset-name", "random",
        "--random-input-len", "12",
        "--random-output-len", "5",
        "--random-range-ratio", "1.0",
        "--num-prompts", "5",
        "--max-concurrency", "2",
        "--warmup-requests", "1",
        "--output-file", str(out),
        "--output-details",
        "--tag", "e2e",
        "--disable-tqdm",
    ]  # fmt: skip
    assert bench_main(argv) == 0
    assert bench_main([*argv, "--request-rate", "50", "--seed", "2"]) == 0

    first, second = (json.loads(line) for line in out.read_text().splitlines())
    for rec in (first, second):
        assert rec["tag"] == "e2e" and rec["backend"] == "openai"
        assert (rec["completed"], rec["failed"]) == (5, 0)
        # ignore_eos makes every server produce exactly the requested tokens
        assert rec["total_output_tokens"] == 25
        assert rec["output_lens"] == [5] * 5
        assert rec["total_input_tokens"] == sum(rec["input_lens"])
        # one gap per streamed chunk after the first; a token whose text is empty (half a
        # multi-byte character) sends no chunk of its own
        assert all(len(gaps) <= 4 for gaps in rec["itls"])
        assert sum(len(gaps) for gaps in rec["itls"]) > 0
        assert all(0 < t <= e for t, e in zip(rec["ttfts"], rec["e2e_latencies"], strict=True))
        assert rec["output_throughput"] > 0
        assert rec["median_e2e_latency_ms"] >= rec["median_ttft_ms"] > 0
    assert first["request_rate"] == "inf" and second["request_rate"] == 50.0


@pytest.mark.parametrize(
    ("backend", "warmup"),
    [("radixserve", "0"), ("radixserve", "1"), ("openai", "0")],
)
def test_nothing_listening_is_a_failed_run_not_a_crash(backend, warmup, capsys):
    argv = [
        "--backend", backend,
        "--port", str(_free_port()),
        "--dataset-name", "random",
        "--random-input-len", "8",
        "--random-output-len", "2",
        "--num-prompts", "2",
        "--warmup-requests", warmup,
        "--disable-tqdm",
    ]  # fmt: skip
    assert bench_main(argv) == 1
    out = capsys.readouterr()
    if backend == "radixserve" and warmup == "0":
        assert "Failed requests:                                 2" in out.out
    else:  # the warm-up or the model lookup finds no server
        assert "radixserve bench:" in out.err
