"""Speculative decoding (n-gram) changes speed, not outputs: the scheduler in-process,
float32, with and without --speculative-algorithm NGRAM on the same requests."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from radixserve.config import ServerArgs
from radixserve.engine.engine_process import eos_token_ids
from radixserve.engine.io_struct import TokenizedGenerateReq
from radixserve.engine.model_runner import ModelRunner
from radixserve.engine.sampling_params import SamplingParams
from radixserve.engine.scheduler import Scheduler
from radixserve.engine.speculative import NgramProposer
from radixserve.layers.attention import KVPool
from radixserve.models.loader import load_tokenizer

NGRAM = {"speculative_algorithm": "NGRAM", "speculative_max_batch_size": 64}
REPETITIVE = [
    "Copy this list exactly: apple, banana, cherry, apple, banana, cherry, apple, banana,",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "one two three four five one two three four five one two three",
]
CHAT = ["What is the capital of France?", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def env():
    args = ServerArgs(dtype="float32", device="cpu", max_total_tokens=8192)
    runner = ModelRunner(args)
    tok = load_tokenizer(runner.source)
    return runner, tok, eos_token_ids(runner.config, tok, runner.source.folder)


def make(env, pool_size: int = 8192, **overrides) -> Scheduler:
    runner, tok, eos = env
    cfg = runner.config
    runner.pool = KVPool(
        cfg.num_hidden_layers, runner.num_kv_heads, runner.head_dim, pool_size, runner.dtype, "cpu"
    )
    args = ServerArgs(dtype="float32", device="cpu", max_total_tokens=pool_size, **overrides)
    return Scheduler(args, runner, tok, eos)


def prompts(env) -> list[list[int]]:
    tok = env[1]
    chats = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in CHAT
    ]
    chats = [list(c["input_ids"]) if hasattr(c, "keys") else list(c) for c in chats]
    return [tok.encode(t) for t in REPETITIVE] + chats


def run(sched: Scheduler, reqs: list[tuple[list[int], SamplingParams]]) -> list[dict]:
    for i, (ids, p) in enumerate(reqs):
        sched.add_request(TokenizedGenerateReq(f"r{i}", ids, p, p.temperature == 0.5, 2))
    out: dict[str, dict] = {}
    while sched.has_work():
        for o in sched.step():
            d = out.setdefault(o.rid, {"ids": [], "lps": []})
            d["ids"] += o.new_token_ids
            d["lps"] += [(lp, [t for t, _ in alts]) for lp, alts in o.logprobs or []]
            if o.finish_reason:
                d["finish"] = o.finish_reason
    assert sched.pool.available() + sched.cache.evictable_size == sched.pool.size
    assert sched.cache.protected_size == 0
    return [out[f"r{i}"] for i in range(len(reqs))]


def test_ngram_proposer_continues_the_latest_match():
    p = NgramProposer(1, 4)
    assert p.propose([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2) == [7, 1]  # latest, longest match
    assert p.propose([5, 6, 7], 3) == []  # no earlier occurrence
    assert p.propose([4, 4, 4], 5) == [4]  # what follows the match, as far as it goes


def test_greedy_outputs_are_identical_with_and_without_speculation(env):
    """Repetitive text (drafts accepted) and chat (mostly rejected), in one batch with a
    request speculation skips (penalties) and one with logprobs, with stop strings and
    max_tokens."""
    greedy = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    reqs = [(p, greedy) for p in prompts(env)]
    reqs.append((reqs[0][0], SamplingParams(max_new_tokens=7, temperature=0, ignore_eos=True)))
    reqs.append((reqs[1][0], SamplingParams(max_new_tokens=40, temperature=0, stop=["sub"])))
    reqs.append((reqs[2][0], SamplingParams(max_new_tokens=20, temperature=0, presence_penalty=1)))
    reqs.append((reqs[0][0], SamplingParams(max_new_tokens=20, temperature=0.5, top_k=1)))
    plain = run(make(env), reqs)
    sched = make(env, **NGRAM)
    spec = run(sched, reqs)
    assert [r["ids"] for r in spec] == [r["ids"] for r in plain]
    assert [r["finish"] for r in spec] == [r["finish"] for r in plain]
    assert len(spec[5]["ids"]) == 7 and spec[6]["finish"].matched == "sub"
    # a logprobs request (sampled, top_k 1) is speculated too: one logprob per token, the
    # plain path's values, the same top alternatives
    assert len(spec[-1]["lps"]) == 20
    for (a, alts_a), (b, alts_b) in zip(spec[-1]["lps"], plain[-1]["lps"], strict=True):
        assert abs(a - b) < 1e-4 and alts_a == alts_b
    s = sched.stats
    assert s.spec_accepted_tokens > 20  # the repetitive prompts really were speculated
    assert s.spec_draft_tokens > s.spec_accepted_tokens  # and some drafts were rejected
    # fewer forward steps than tokens: that is the point
    assert s.forward_steps < sum(len(r["ids"]) for r in spec)


def chi_square_p(a: Counter, b: Counter) -> float:
    """Two-sample chi-square test of homogeneity; categories seen fewer than 10 times
    together are pooled."""
    keys = [k for k in a.keys() | b.keys() if a[k] + b[k] >= 10]
    rows = [[a[k] for k in keys], [b[k] for k in keys]]
    rows[0].append(sum(a.values()) - sum(rows[0]))
    rows[1].append(sum(b.values()) - sum(rows[1]))
    t = torch.tensor(rows, dtype=torch.float64)
    t = t[:, t.sum(0) > 0]
    expected = t.sum(1, keepdim=True) * t.sum(0, keepdim=True) / t.sum()
    stat = ((t - expected) ** 2 / expected).sum()
    df = t.shape[1] - 1
    return torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2).item()


def test_sampled_outputs_keep_the_target_distribution(env):
    """600 unseeded samples of tokens 2-3 after a repetitive prompt (drafted and verified by
    the rejection rule) against 600 without speculation: the same distribution."""
    prompt = prompts(env)[2]
    p = SamplingParams(max_new_tokens=3, temperature=1.0, top_k=4, ignore_eos=True)
    n = 600
    plain = run(make(env, random_seed=1), [(prompt, p)] * n)
    sched = make(env, random_seed=2, **{**NGRAM, "speculative_max_batch_size": n})
    spec = run(sched, [(prompt, p)] * n)
    assert sched.stats.spec_draft_tokens > 0
    assert 0 < sched.stats.spec_accepted_tokens < sched.stats.spec_draft_tokens
    for pos in (slice(0, 2), slice(1, 3)):  # (token 1, 2) and (token 2, 3) pairs
        a = Counter(tuple(r["ids"][pos]) for r in plain)
        b = Counter(tuple(r["ids"][pos]) for r in spec)
        assert chi_square_p(a, b) > 1e-3, (a.most_common(6), b.most_common(6))


def test_abort_mid_verification_frees_every_slot(env):
    tok = env[1]
    sched = make(env, **NGRAM)
    greedy = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)
    for i, text in enumerate(REPETITIVE):
        sched.add_request(TokenizedGenerateReq(f"a{i}", tok.encode(text), greedy))
    while sched.stats.spec_draft_tokens == 0:
        sched.step()
    for i in range(len(REPETITIVE)):
        sched.abort(f"a{i}")
    while sched.has_work():
        sched.step()
    assert sched.pool.available() + sched.cache.evictable_size == sched.pool.size
    assert sched.cache.protected_size == 0
