"""The sampler on crafted logits: each setting does what its definition says, per row."""

from __future__ import annotations

import math

import torch
from radixserve.engine.sampler import SamplingRow, apply_penalties, sample
from radixserve.engine.sampling_params import SamplingParams


def row(prompt=(), output=(), stop_ids=(), seed=None, **kw) -> SamplingRow:
    p = SamplingParams(**kw)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(p, list(prompt), list(output), list(stop_ids), gen)


def test_greedy_is_argmax_and_top_k_1_equals_greedy():
    logits = torch.tensor([[0.1, 2.0, 0.3, 1.9], [5.0, 0.0, 0.0, 4.9]])
    assert sample(logits.clone(), [row(temperature=0), row(temperature=0)])[0] == [1, 0]
    ids, _ = sample(logits.clone(), [row(temperature=1.0, top_k=1), row(temperature=0.7, top_k=1)])
    assert ids == [1, 0]


def test_frequency_and_presence_penalties_follow_their_definitions():
    logits = torch.zeros(1, 5)
    out = apply_penalties(
        logits, [row(output=[1, 1, 1, 3], frequency_penalty=0.5, presence_penalty=0.25)]
    )
    # token 1 seen 3 times: -0.5*3 - 0.25; token 3 once: -0.5 - 0.25; others untouched
    assert torch.allclose(out[0], torch.tensor([0.0, -1.75, 0.0, -0.75, 0.0]))


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    out = apply_penalties(logits, [row(prompt=[0], output=[1], repetition_penalty=2.0)])
    assert out[0].tolist() == [1.0, -4.0, 2.0, -2.0]


def test_penalties_do_not_leak_between_rows():
    logits = torch.zeros(2, 4)
    out = apply_penalties(logits, [row(output=[2, 2], frequency_penalty=1.0), row(output=[2, 2])])
    assert out[0, 2].item() == -2.0
    assert out[1].abs().sum().item() == 0.0


def test_logit_bias_and_min_new_tokens():
    logits = torch.zeros(1, 4)
    out = apply_penalties(logits, [row(logit_bias={3: 5.0})])
    assert out[0].tolist() == [0.0, 0.0, 0.0, 5.0]
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0]])
    ids, _ = sample(
        logits, [row(output=[1], stop_ids=[2], temperature=0, min_new_tokens=3, max_new_tokens=8)]
    )
    assert ids != [2]  # eos is masked until min_new_tokens are out


def test_same_seed_same_draws_whatever_shares_the_batch():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(3))
    r = row(seed=7)
    alone = [sample(logits.clone(), [r])[0][0] for _ in range(20)]
    r2 = row(seed=7)
    batched = [
        sample(torch.cat([logits, torch.randn(2, 50)]), [r2, row(), row(seed=99)])[0][0]
        for _ in range(20)
    ]
    assert alone == batched
    assert len(set(alone)) > 1  # it is sampling, not greedy


def test_top_p_and_min_p_cut_the_tail():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)
    seen_p = {sample(logits.clone(), [row(top_p=0.6)], gen)[0][0] for _ in range(300)}
    assert seen_p == {0, 1}  # 0.5 alone does not reach 0.6, so token 1 is kept
    seen_min = {sample(logits.clone(), [row(min_p=0.5)], gen)[0][0] for _ in range(300)}
    assert seen_min == {0, 1}  # 0.15 < 0.5 * 0.5
    seen_k = {sample(logits.clone(), [row(top_k=3)], gen)[0][0] for _ in range(300)}
    assert seen_k == {0, 1, 2}


def test_temperature_sampling_follows_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(1)
    n = 3000
    counts = torch.zeros(3)
    for _ in range(n):
        counts[sample(logits.clone(), [row(temperature=2.0)], gen)[0][0]] += 1
    expect = torch.softmax(logits[0] / 2.0, -1)
    assert torch.allclose(counts / n, expect, atol=0.03)


def test_logprobs_are_log_softmax_with_top_alternatives():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    r = row(temperature=0)
    r.return_logprob, r.top_logprobs_num = True, 2
    ids, lps = sample(logits.clone(), [r])
    expect = torch.log_softmax(logits[0], -1)
    lp, alts = lps[0]
    assert ids == [0] and math.isclose(lp, expect[0].item(), rel_tol=1e-5)
    assert [a for a, _ in alts] == [0, 1]
    assert math.isclose(alts[1][1], expect[1].item(), rel_tol=1e-5)


def test_sampling_params_reject_bad_values_naming_the_field():
    import pytest

    for bad, field in [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": float("nan")}, "temperature"),
        ({"stop": [""]}, "stop"),
        ({"bogus": 1}, "bogus"),
        ({"n": 0}, "n"),
    ]:
        with pytest.raises(ValueError, match=field):
            SamplingParams.from_dict(bad)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams.from_dict({"stop_token_ids": [10**9]}).verify(vocab_size=100)
