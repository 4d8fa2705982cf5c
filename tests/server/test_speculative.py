"""Speculative decoding changes speed, not outputs: the scheduler in-process, float32, with
and without --speculative-algorithm NGRAM / STANDALONE on the same requests. The draft
models: the default model itself (drafts mostly accepted) and a tiny random model of the
same vocabulary (drafts mostly rejected)."""

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
from radixserve.engine.speculative import NgramProposer, build_draft_runner, cut_by_grammar
from radixserve.layers.attention import KVPool
from radixserve.models.loader import load_tokenizer

from tests.server.tiny_models import tiny_qwen3

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


@pytest.fixture(scope="module")
def drafts(env, tmp_path_factory) -> dict[str, ModelRunner]:
    target = env[0]
    tiny = tiny_qwen3(
        str(tmp_path_factory.mktemp("draft")),
        heads=4,
        kv_heads=2,
        head_dim=16,
        hidden_size=64,
        intermediate_size=128,
        vocab_size=target.vocab_size,
    )
    out = {}
    for name, path in (("same", target.source.path), ("tiny", tiny)):
        args = ServerArgs(
            dtype="float32",
            device="cpu",
            max_total_tokens=8192,
            speculative_algorithm="STANDALONE",
            speculative_draft_model_path=path,
        )
        out[name] = build_draft_runner(args, target)
    return out


def fresh_pool(runner: ModelRunner, size: int) -> None:
    cfg = runner.config
    runner.pool = KVPool(
        cfg.num_hidden_layers, runner.num_kv_heads, runner.head_dim, size, runner.dtype, "cpu"
    )


def make(env, pool_size: int = 8192, draft: ModelRunner | None = None, **overrides) -> Scheduler:
    runner, tok, eos = env
    fresh_pool(runner, pool_size)
    if draft is not None:
        fresh_pool(draft, pool_size)
        overrides = {
            "speculative_algorithm": "STANDALONE",
            "speculative_draft_model_path": draft.source.path,
            "speculative_max_batch_size": 64,
            **overrides,
        }
    args = ServerArgs(dtype="float32", device="cpu", max_total_tokens=pool_size, **overrides)
    return Scheduler(args, runner, tok, eos, draft_runner=draft)


def draft_pool_is_free(sched: Scheduler) -> bool:
    pool = sched.spec.proposer.pool
    return pool.available() == pool.size


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


@pytest.fixture(scope="module")
def greedy_case(env):
    """Repetitive text (drafts accepted) and chat (mostly rejected), in one batch with
    penalties, stop strings, max_tokens, min_tokens, logit bias and logprobs; and the
    outputs without speculation."""
    greedy = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    reqs = [(p, greedy) for p in prompts(env)]
    reqs.append((reqs[0][0], SamplingParams(max_new_tokens=7, temperature=0, ignore_eos=True)))
    reqs.append((reqs[1][0], SamplingParams(max_new_tokens=40, temperature=0, stop=["sub"])))
    reqs.append((reqs[2][0], SamplingParams(max_new_tokens=20, temperature=0, presence_penalty=1)))
    reqs.append(
        (reqs[0][0], SamplingParams(max_new_tokens=20, temperature=0, frequency_penalty=0.3))
    )
    # min_tokens bans the end tokens for 12 tokens; the bias pushes one token up
    banana = env[1].encode(" banana")[0]
    reqs.append(
        (
            reqs[3][0],
            SamplingParams(
                max_new_tokens=24, temperature=0, min_new_tokens=12, logit_bias={banana: 4}
            ),
        )
    )
    reqs.append((reqs[0][0], SamplingParams(max_new_tokens=20, temperature=0.5, top_k=1)))
    return reqs, run(make(env), reqs)


def check_identical(spec: list[dict], plain: list[dict]) -> None:
    assert [r["ids"] for r in spec] == [r["ids"] for r in plain]
    assert [r["finish"] for r in spec] == [r["finish"] for r in plain]
    assert len(spec[5]["ids"]) == 7 and spec[6]["finish"].matched == "sub"
    # a logprobs request (sampled, top_k 1) is speculated too: one logprob per token, the
    # plain path's values, the same top alternatives
    assert len(spec[-1]["lps"]) == 20
    for (a, alts_a), (b, alts_b) in zip(spec[-1]["lps"], plain[-1]["lps"], strict=True):
        assert abs(a - b) < 1e-4 and alts_a == alts_b


def test_greedy_outputs_are_identical_with_and_without_speculation(env, greedy_case):
    reqs, plain = greedy_case
    sched = make(env, **NGRAM)
    spec = run(sched, reqs)
    check_identical(spec, plain)
    s = sched.stats
    assert s.spec_accepted_tokens > 20  # the repetitive prompts really were speculated
    assert s.spec_draft_tokens > s.spec_accepted_tokens  # and some drafts were rejected
    # fewer forward steps than tokens: that is the point
    assert s.forward_steps < sum(len(r["ids"]) for r in spec)


@pytest.mark.parametrize("which", ["same", "tiny"])
def test_draft_model_outputs_are_identical(env, drafts, greedy_case, which):
    """STANDALONE: drafts from a second model, verified the same way. With the model itself
    as its draft nearly every draft is accepted; with a random tiny model nearly none, and
    the per-request backoff stops drafting. The draft pool is empty afterwards."""
    reqs, plain = greedy_case
    sched = make(env, draft=drafts[which])
    spec = run(sched, reqs)
    check_identical(spec, plain)
    s = sched.stats
    assert draft_pool_is_free(sched)
    assert s.spec_rounds > 0
    if which == "same":
        assert s.spec_accepted_tokens > 0.9 * s.spec_draft_tokens
        assert s.forward_steps * 2 < sum(len(r["ids"]) for r in spec)
    else:
        assert s.spec_accepted_tokens < 0.2 * s.spec_draft_tokens


def test_draft_model_catches_up_long_prompts_in_chunks(env, drafts, greedy_case):
    """With chunked prefill the draft model's catch-up of a prompt goes a chunk a step too
    (no single huge extend); drafting starts once it has caught up."""
    reqs, plain = greedy_case
    sched = make(env, draft=drafts["same"], chunked_prefill_size=8)
    assert max(len(ids) for ids, _ in reqs[:5]) > 3 * 8
    spec = run(sched, reqs[:5])
    assert [r["ids"] for r in spec] == [r["ids"] for r in plain[:5]]
    assert sched.stats.spec_accepted_tokens > 0.9 * sched.stats.spec_draft_tokens > 0
    assert draft_pool_is_free(sched)


def test_grammar_masks_drafted_positions(env, drafts):
    """A JSON-schema request whose output repeats itself is speculated (n-gram and draft
    model): every drafted position is masked by the grammar in the state its drafts lead to,
    and the output is the plain one, valid JSON."""
    import json

    tok = env[1]
    schema = json.dumps(
        {
            "type": "object",
            "properties": {
                "fruits": {
                    "type": "array",
                    "items": {"enum": ["apple", "banana", "cherry"]},
                    "minItems": 9,
                    "maxItems": 9,
                }
            },
            "required": ["fruits"],
        }
    )
    prompt = tok.encode("List nine fruits as JSON: apple, banana, cherry, apple, banana, cherry,")
    p = SamplingParams(max_new_tokens=80, temperature=0, json_schema=schema)
    plain = run(make(env), [(prompt, p)])
    text = tok.decode(plain[0]["ids"], skip_special_tokens=True)
    assert len(json.loads(text)["fruits"]) == 9
    for sched in (make(env, **NGRAM), make(env, draft=drafts["same"])):
        spec = run(sched, [(prompt, p)])
        assert spec[0]["ids"] == plain[0]["ids"]
        assert sched.stats.spec_accepted_tokens > 5


def test_grammar_cuts_a_draft_at_the_first_forbidden_token(env):
    sched = make(env)
    tok = env[1]
    compiled = sched.grammar_backend().submit("regex", "[0-9]{1,6}").result()
    row = type("Row", (), {})()
    row.grammar = sched.grammar_backend().matcher(compiled)
    digits = [tok.encode(d)[0] for d in "123"]
    drafts = digits + tok.encode(" apple")
    assert cut_by_grammar(row, drafts) == digits
    # the matcher is where it was: the same cut again, and the digits are still allowed
    assert cut_by_grammar(row, drafts) == digits
    assert row.grammar.accept_token(digits[0])


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


SAMPLED = SamplingParams(max_new_tokens=3, temperature=1.0, top_k=4, ignore_eos=True)
N_SAMPLES = 600


@pytest.fixture(scope="module")
def sampled_plain(env) -> list[dict]:
    return run(make(env, random_seed=1), [(prompts(env)[2], SAMPLED)] * N_SAMPLES)


@pytest.mark.parametrize("algorithm", ["NGRAM", "STANDALONE"])
def test_sampled_outputs_keep_the_target_distribution(env, drafts, sampled_plain, algorithm):
    """600 unseeded samples of tokens 2-3 after a repetitive prompt (drafted and verified by
    the rejection rule) against 600 without speculation: the same distribution."""
    n = N_SAMPLES
    if algorithm == "NGRAM":
        sched = make(env, random_seed=2, **{**NGRAM, "speculative_max_batch_size": n})
    else:
        sched = make(env, draft=drafts["same"], random_seed=2, speculative_max_batch_size=n)
    spec = run(sched, [(prompts(env)[2], SAMPLED)] * n)
    assert sched.stats.spec_draft_tokens > 0
    assert 0 < sched.stats.spec_accepted_tokens < sched.stats.spec_draft_tokens
    for pos in (slice(0, 2), slice(1, 3)):  # (token 1, 2) and (token 2, 3) pairs
        a = Counter(tuple(r["ids"][pos]) for r in sampled_plain)
        b = Counter(tuple(r["ids"][pos]) for r in spec)
        assert chi_square_p(a, b) > 1e-3, (a.most_common(6), b.most_common(6))


@pytest.mark.parametrize("algorithm", ["NGRAM", "STANDALONE"])
def test_abort_mid_verification_frees_every_slot(env, drafts, algorithm):
    tok = env[1]
    sched = make(env, **NGRAM) if algorithm == "NGRAM" else make(env, draft=drafts["same"])
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
    if algorithm == "STANDALONE":
        assert draft_pool_is_free(sched)


def test_standalone_flags_are_checked(env, drafts):
    with pytest.raises(ValueError, match="needs --speculative-draft-model-path"):
        ServerArgs(speculative_algorithm="STANDALONE")
    with pytest.raises(ValueError, match="read only with"):
        ServerArgs(speculative_draft_model_path="/x.gguf")
    with pytest.raises(ValueError, match="--tp-size 1 only"):
        ServerArgs(
            speculative_algorithm="STANDALONE",
            speculative_draft_model_path="/x.gguf",
            tp_size=2,
            dist_init_addr="127.0.0.1:1234",
        )
    # a draft of another vocabulary is refused with both sizes named
    runner = env[0]
    other = drafts["tiny"]
    other.vocab_size, saved = other.vocab_size + 1, other.vocab_size
    try:
        with pytest.raises(ValueError, match=f"{saved + 1} tokens, the target's {saved}"):
            from radixserve.engine.speculative import check_draft_vocab

            check_draft_vocab(other, runner)
    finally:
        other.vocab_size = saved
    # /server_info's description names the draft model and its path
    sched = make(env, draft=drafts["same"])
    info = sched.spec.describe(sched.args)
    assert info["algorithm"] == "STANDALONE" and info["draft_model"] == runner.source.path
    assert info["draft_kv_tokens"] == sched.spec.proposer.pool.size
