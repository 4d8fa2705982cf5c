"""Continuous batching changes nothing but speed: the scheduler in-process, float32.

One model is loaded for the module; each test gets a fresh KV pool and scheduler with the
settings under test, and compares greedy tokens with requests run one at a time.
"""

from __future__ import annotations

import pytest
import torch
from radixserve.config import ServerArgs
from radixserve.engine.engine_process import eos_token_ids
from radixserve.engine.io_struct import FinishAbort, FinishLength, FinishStop, TokenizedGenerateReq
from radixserve.engine.model_runner import ModelRunner
from radixserve.engine.sampling_params import SamplingParams
from radixserve.engine.scheduler import Scheduler
from radixserve.layers.attention import KVPool
from radixserve.models.loader import load_tokenizer

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain photosynthesis in one sentence.",
    "Who wrote Hamlet?",
    "What is 12 times 12?",
    "Name a color of the rainbow.",
    "Translate 'good morning' to Spanish.",
    "Give me a synonym for happy.",
    "What is the boiling point of water in Celsius?",
    "Describe a cat in five words.",
    "What language is spoken in Brazil?",
    "Tell me a fun fact about octopuses.",
    "What does CPU stand for?",
    "Suggest a name for a pet goldfish.",
    "How many days are in a leap year?",
]


@pytest.fixture(scope="module")
def env():
    args = ServerArgs(dtype="float32", device="cpu", max_total_tokens=8192)
    runner = ModelRunner(args)
    tok = load_tokenizer(runner.source)
    eos = eos_token_ids(runner.config, tok, runner.source.folder)
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
        )
        for q in QUESTIONS
    ]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
    return runner, tok, eos, prompts


def make(env, pool_size: int = 8192, **overrides) -> Scheduler:
    runner, tok, eos, _ = env
    cfg = runner.config
    runner.pool = KVPool(
        cfg.num_hidden_layers, runner.num_kv_heads, runner.head_dim, pool_size, runner.dtype, "cpu"
    )
    args = ServerArgs(dtype="float32", device="cpu", max_total_tokens=pool_size, **overrides)
    return Scheduler(args, runner, tok, eos)


def run(
    sched: Scheduler,
    reqs: list[tuple[list[int], SamplingParams]],
    max_running_seen: list | None = None,
) -> dict:
    for i, (ids, p) in enumerate(reqs):
        sched.add_request(TokenizedGenerateReq(f"r{i}", ids, p))
    out: dict[str, dict] = {}
    while sched.has_work():
        for o in sched.step():
            d = out.setdefault(o.rid, {"ids": []})
            d["ids"] += o.new_token_ids
            if o.finish_reason:
                d["finish"] = o.finish_reason
                d["cached"] = o.cached_tokens
        if max_running_seen is not None:
            max_running_seen.append(len(sched.running))
    assert_pool_whole(sched)
    return {k: out[k] for k in sorted(out, key=lambda r: int(r[1:]))}


def assert_pool_whole(sched: Scheduler) -> None:
    """Every slot is free or cached; nothing is still referenced once all requests ended."""
    assert sched.pool.available() + sched.cache.evictable_size == sched.pool.size
    assert sched.cache.protected_size == 0


GREEDY = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def one_at_a_time(env):
    prompts = env[3]
    sched = make(env, disable_radix_cache=True)
    return [run(sched, [(p, GREEDY)])["r0"]["ids"] for p in prompts]


def tokens(result: dict) -> list[list[int]]:
    return [r["ids"] for r in result.values()]


def test_sixteen_together_equal_one_at_a_time(env, one_at_a_time):
    seen: list[int] = []
    result = run(make(env), [(p, GREEDY) for p in env[3]], seen)
    assert max(seen) == 16  # they really ran as one batch
    assert tokens(result) == one_at_a_time


def test_tiny_prefill_chunks_change_nothing(env, one_at_a_time):
    sched = make(env, chunked_prefill_size=7, max_prefill_tokens=7)
    assert tokens(run(sched, [(p, GREEDY) for p in env[3]])) == one_at_a_time


def test_retraction_under_a_tiny_pool_keeps_outputs(env, one_at_a_time):
    longest = max(len(p) for p in env[3])
    sched = make(env, pool_size=longest + 16 + 40)
    result = run(sched, [(p, GREEDY) for p in env[3]])
    assert sched.stats.num_retractions > 0
    assert tokens(result) == one_at_a_time
    # a re-admitted request is not counted again: prompts and cache hits once per request
    assert sched.stats.prompt_tokens == sum(len(p) for p in env[3])
    assert sched.stats.cache_hit_tokens == sum(r["cached"] for r in result.values())
    assert all(r["finish"].type == "length" for r in result.values())


def test_max_running_requests_caps_the_batch(env, one_at_a_time):
    seen: list[int] = []
    result = run(make(env, max_running_requests=3), [(p, GREEDY) for p in env[3][:6]], seen)
    assert max(seen) == 3
    assert tokens(result) == one_at_a_time[:6]


def test_shared_prefix_is_reused_and_output_unchanged(env):
    tok = env[1]
    prefix = tok.encode("You are a careful assistant. " * 40)
    assert len(prefix) >= 200
    a = prefix + tok.encode(" Question: what is two plus two?")
    b = prefix + tok.encode(" Question: name a large animal.")
    p = SamplingParams(max_new_tokens=16, temperature=0)
    sched = make(env)
    run(sched, [(a, p)])
    cached = run(sched, [(b, p)])["r0"]
    assert cached["cached"] >= len(prefix)
    fresh = run(make(env, disable_radix_cache=True), [(b, p)])["r0"]
    assert fresh["cached"] == 0
    assert cached["ids"] == fresh["ids"]


def test_prompts_arriving_together_compute_their_shared_prefix_once(env):
    """Four prompts with one uncached 200+-token prefix, submitted at once: the first
    computes it, the others wait a step and read it from the cache; outputs unchanged."""
    tok = env[1]
    prefix = tok.encode("You are a careful assistant. " * 40)
    asks = [" Question: what is two plus two?", " Question: name a large animal."] * 2
    p = SamplingParams(max_new_tokens=8, temperature=0)
    reqs = [(prefix + tok.encode(q + " " * i), p) for i, q in enumerate(asks)]
    sched = make(env)
    out = run(sched, reqs)
    assert out["r0"]["cached"] == 0
    assert all(out[f"r{i}"]["cached"] >= len(prefix) for i in (1, 2, 3))
    assert sched.stats.prefix_deferrals >= 3
    alone = run(make(env, disable_radix_cache=True), reqs)
    assert [out[f"r{i}"]["ids"] for i in range(4)] == [alone[f"r{i}"]["ids"] for i in range(4)]


def test_abort_frees_slots_at_once(env):
    sched = make(env)
    sched.add_request(
        TokenizedGenerateReq(
            "a", env[3][0], SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True)
        )
    )
    for _ in range(3):
        sched.step()
    assert sched.cache.protected_size > 0
    sched.abort("a")
    outs = sched.step()
    assert [o.finish_reason for o in outs] == [FinishAbort("aborted")]
    assert not sched.has_work()
    assert_pool_whole(sched)


def test_stop_token_ids_and_stop_strings(env, one_at_a_time):
    tok = env[1]
    want = one_at_a_time[0]
    stop_id = want[3]
    res = run(
        make(env),
        [(env[3][0], SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=[stop_id]))],
    )["r0"]
    assert res["finish"] == FinishStop(stop_id)
    assert res["ids"] == want[: want.index(stop_id) + 1]
    text = tok.decode(want)
    stop = text.split()[2]
    res = run(
        make(env), [(env[3][0], SamplingParams(max_new_tokens=16, temperature=0, stop=[stop]))]
    )["r0"]
    assert res["finish"] == FinishStop(stop)
    assert stop in tok.decode(res["ids"]) and len(res["ids"]) < len(want)


def test_seeded_requests_repeat_alone_and_in_a_batch(env):
    p = SamplingParams(max_new_tokens=16, temperature=0.9, seed=1234, ignore_eos=True)
    prompts = env[3]
    alone = run(make(env), [(prompts[1], p)])["r0"]["ids"]
    again = run(make(env), [(prompts[1], p)])["r0"]["ids"]
    other = SamplingParams(max_new_tokens=16, temperature=0.9, ignore_eos=True)
    batched = run(make(env), [(prompts[0], other), (prompts[1], p), (prompts[2], other)])["r1"][
        "ids"
    ]
    assert alone == again == batched
    unseeded = {tuple(run(make(env), [(prompts[1], other)])["r0"]["ids"]) for _ in range(2)}
    assert len(unseeded) == 2 or tuple(alone) not in unseeded  # sampling, not a fixed answer


def test_bad_requests_finish_with_a_reason_instead_of_crashing(env):
    sched = make(env)
    res = run(
        sched, [([], GREEDY), ([10**7], GREEDY), (env[3][0], SamplingParams(max_new_tokens=0))]
    )
    assert res["r0"]["finish"] == FinishAbort("empty prompt")
    assert "vocabulary" in res["r1"]["finish"].message
    assert res["r2"]["finish"] == FinishLength() and res["r2"]["ids"] == []


def test_constrained_requests_leave_unconstrained_greedy_tokens_alone(env, one_at_a_time):
    import json

    schema = json.dumps(
        {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    )
    constrained = SamplingParams(max_new_tokens=24, temperature=0.7, seed=3, json_schema=schema)
    reqs = []
    for i, p in enumerate(env[3][:6]):
        reqs.append((p, GREEDY))
        if i % 2 == 0:
            reqs.append((p, constrained))
    result = list(run(make(env), reqs).values())
    plain = [r["ids"] for (_, params), r in zip(reqs, result, strict=True) if params is GREEDY]
    assert plain == one_at_a_time[:6]
    tok = env[1]
    for (_, params), r in zip(reqs, result, strict=True):
        if params is constrained:
            assert isinstance(json.loads(tok.decode(r["ids"], skip_special_tokens=True))["x"], int)


def test_out_of_memory_in_a_forward_retries_with_a_smaller_batch(env, one_at_a_time, monkeypatch):
    """A forward that runs out of memory (injected once, for a batch of more than four
    requests) is undone and retried smaller; outputs do not change."""
    runner = env[0]
    real = runner.forward
    failed = []

    def forward(batch, rows):
        if not failed and batch.batch_size > 4:
            failed.append(batch.batch_size)
            raise torch.OutOfMemoryError("injected: out of memory")
        return real(batch, rows)

    monkeypatch.setattr(runner, "forward", forward)
    sched = make(env)
    result = run(sched, [(p, GREEDY) for p in env[3][:8]])
    assert failed and sched.stats.num_oom_retries == 1
    assert tokens(result) == one_at_a_time[:8]


def _run_msgs(sched: Scheduler, msgs: list[TokenizedGenerateReq]) -> tuple[dict, list[str]]:
    """Outputs by rid, and the rids in the order their first token came."""
    for m in msgs:
        sched.add_request(m)
    out: dict[str, dict] = {}
    first: list[str] = []
    while sched.has_work():
        for o in sched.step():
            d = out.setdefault(o.rid, {"ids": []})
            if o.new_token_ids and not d["ids"]:
                first.append(o.rid)
            d["ids"] += o.new_token_ids
            if o.finish_reason:
                d["finish"], d["cached"] = o.finish_reason, o.cached_tokens
    assert_pool_whole(sched)
    return out, first


def test_priority_orders_admission_only_when_enabled(env):
    p = env[3]
    msgs = [
        TokenizedGenerateReq("low-a", p[0], GREEDY, priority=5),
        TokenizedGenerateReq("low-b", p[1], GREEDY, priority=5),
        TokenizedGenerateReq("urgent", p[2], GREEDY, priority=-1),
    ]
    _, order = _run_msgs(make(env, max_running_requests=1, enable_priority_scheduling=True), msgs)
    assert order == ["urgent", "low-a", "low-b"]  # lower value first, then arrival
    _, order = _run_msgs(make(env, max_running_requests=1), msgs)
    assert order == ["low-a", "low-b", "urgent"]  # without the flag: arrival order


def test_an_urgent_arrival_preempts_a_less_urgent_running_request(env, one_at_a_time):
    """The batch is full (max_running_requests 1) with a low-priority request mid-decode; an
    urgent one arrives: it starts at the next step, and the retracted request later
    finishes with the tokens it would have had alone."""
    p = env[3]
    sched = make(env, max_running_requests=1, enable_priority_scheduling=True)
    sched.add_request(TokenizedGenerateReq("low", p[0], GREEDY, stream=True, priority=5))
    out: dict[str, list[int]] = {"low": [], "urgent": []}
    order: list[str] = []
    for _ in range(4):
        for o in sched.step():
            out[o.rid] += o.new_token_ids
    assert 0 < len(out["low"]) < 16
    sched.add_request(TokenizedGenerateReq("urgent", p[1], GREEDY, stream=True, priority=0))
    while sched.has_work():
        for o in sched.step():
            out[o.rid] += o.new_token_ids
            if o.finish_reason:
                order.append(o.rid)
    assert order == ["urgent", "low"]
    assert sched.stats.num_retractions == 1
    assert [out["low"], out["urgent"]] == one_at_a_time[:2]
    assert_pool_whole(sched)


def test_memory_shortage_retracts_the_least_urgent_first(env, one_at_a_time, monkeypatch):
    """Two requests outgrow the pool while decoding: the older but less urgent one is
    retracted (without priorities the newer one would be); both outputs are unchanged."""
    p = env[3]
    params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    msgs = [
        TokenizedGenerateReq("old-low", p[0], params, priority=9),
        TokenizedGenerateReq("new-urgent", p[1], params, priority=0),
    ]
    for flag, expected in ((True, "old-low"), (False, "new-urgent")):
        # no prefix cache: the two chat prompts share their template's system prompt
        size = len(p[0]) + len(p[1]) + 12
        sched = make(env, size, disable_radix_cache=True, enable_priority_scheduling=flag)
        retracted: list[str] = []
        real = sched._retract
        monkeypatch.setattr(
            sched, "_retract", lambda r, seen=retracted, f=real: (seen.append(r.rid), f(r))
        )
        out, _ = _run_msgs(sched, msgs)
        assert retracted and retracted[0] == expected, (flag, retracted)
        assert [out["old-low"]["ids"], out["new-urgent"]["ids"]] == one_at_a_time[:2]


def test_cache_salt_separates_prefixes_and_same_salt_shares(env):
    tok = env[1]
    prompt = tok.encode("You are a careful assistant. " * 30 + "Name a large animal.")
    params = SamplingParams(max_new_tokens=8, temperature=0)
    sched = make(env)

    def once(rid: str, salt: str | None) -> dict:
        out, _ = _run_msgs(sched, [TokenizedGenerateReq(rid, prompt, params, cache_salt=salt)])
        return out[rid]

    first = once("a1", "tenant-a")
    assert first["cached"] == 0
    assert once("b1", "tenant-b")["cached"] == 0  # another salt never reads it
    assert once("plain", None)["cached"] == 0  # nor does an unsalted request
    again = once("a2", "tenant-a")
    assert again["cached"] >= len(prompt) - 8  # the same salt does
    assert again["ids"] == first["ids"]


def test_prompt_logprobs_do_not_depend_on_chunks_or_the_cache(env):
    """Scored in chunks of 7 tokens, or after the prompt was cached, the prompt's logprobs
    are those of one whole prefill."""
    prompt = env[3][0]
    params = SamplingParams(max_new_tokens=0, temperature=0)

    def score(sched: Scheduler, rid: str) -> list:
        msg = TokenizedGenerateReq(rid, prompt, params, True, 3, logprob_start_len=0)
        out = []
        sched.add_request(msg)
        while sched.has_work():
            out += [o for o in sched.step() if o.prompt_logprobs is not None]
        assert_pool_whole(sched)
        assert len(out) == 1 and out[0].finish_reason.type == "length"
        return out[0].prompt_logprobs

    whole = score(make(env), "whole")
    assert len(whole) == len(prompt) and whole[0] == (None, [])
    sched = make(env, chunked_prefill_size=7, max_prefill_tokens=7)
    for rid in ("chunked", "cached"):  # the second run finds the prompt in the cache
        got = score(sched, rid)
        assert got[0] == (None, [])
        for (a, alts_a), (b, alts_b) in zip(got[1:], whole[1:], strict=True):
            assert abs(a - b) < 1e-4
            assert [t for t, _ in alts_a] == [t for t, _ in alts_b]
