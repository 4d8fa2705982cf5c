"""Batched sampling: one pass over the batch's logits, each row with its own settings.

Order (as in vLLM/SGLang): logit bias and penalties on the raw logits, min_new_tokens,
then greedy rows take argmax; the others are scaled by temperature and filtered by top_k,
top_p and min_p before one draw. Draws use the exponential-race trick
(argmax p / Exp(1) samples from p) so a request with a seed draws its noise from its own
generator and repeats exactly whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixserve.engine.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs of one request."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    stop_ids: list[int]  # ids that end generation (eos + stop_token_ids), masked by min_new_tokens
    generator: torch.Generator | None
    top_logprobs_num: int = 0
    return_logprob: bool = False
    grammar: object | None = None  # an xgrammar GrammarMatcher when the output is constrained


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Logit bias, frequency/presence/repetition penalties and min_new_tokens, in place.

    Each kind reaches the device as one tensor for the whole batch: on CUDA a tensor built
    from Python lists is a blocking copy, so one per request would stall once per request.
    """
    vocab, device = logits.shape[-1], logits.device
    bias = [(i, t, b) for i, r in enumerate(rows) for t, b in r.params.logit_bias.items()]
    if bias:
        at = torch.tensor([(i, t) for i, t, _ in bias], dtype=torch.int64).to(device)
        values = torch.tensor([b for _, _, b in bias], dtype=logits.dtype).to(device)
        logits.index_put_((at[:, 0], at[:, 1]), values, accumulate=True)
    pen = [i for i, r in enumerate(rows) if r.params.has_penalties]
    if pen:
        ps = [rows[i].params for i in pen]
        knobs = torch.tensor(
            [(p.frequency_penalty, p.presence_penalty, p.repetition_penalty) for p in ps],
            dtype=logits.dtype,
        ).to(device)
        at = torch.tensor(pen, dtype=torch.int64).to(device)
        sub = logits[at]
        counts = _token_table([rows[i].output_ids for i in pen], vocab, device)
        sub -= knobs[:, :1] * counts + knobs[:, 1:2] * (counts > 0).to(sub.dtype)
        if any(p.repetition_penalty != 1.0 for p in ps):
            seen = (
                _token_table([rows[i].prompt_ids + rows[i].output_ids for i in pen], vocab, device)
                > 0
            )
            rep = knobs[:, 2:3]
            sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        logits[at] = sub
    banned = [
        (i, t)
        for i, r in enumerate(rows)
        if len(r.output_ids) < r.params.min_new_tokens
        for t in r.stop_ids
    ]
    if banned:
        at = torch.tensor(banned, dtype=torch.int64).to(device)
        logits[at[:, 0], at[:, 1]] = float("-inf")
    return logits


def _token_table(ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(ids), vocab] float counts of each row's token ids, from one padded copy."""
    width = max((len(x) for x in ids), default=0)
    padded = torch.full((len(ids), max(width, 1)), vocab, dtype=torch.int64)
    for row, x in enumerate(ids):
        padded[row, : len(x)] = torch.tensor(x, dtype=torch.int64)
    counts = torch.zeros(len(ids), vocab + 1, device=device)
    counts.scatter_add_(1, padded.to(device), torch.ones(padded.shape, device=device))
    return counts[:, :vocab]


@torch.inference_mode()
def sample(
    logits: torch.Tensor, rows: list[SamplingRow], shared: torch.Generator | None = None
) -> tuple[list[int], list[tuple[float, list[tuple[int, float]]]] | None]:
    """Next token per row, and (when any row asks) its logprob with top alternatives."""
    logits = apply_penalties(logits.float(), rows)
    if any(r.grammar is not None for r in rows):
        from radixserve.engine.grammar import apply_grammar_masks

        apply_grammar_masks(logits, [r.grammar for r in rows])
    logprob_info = None
    if any(r.return_logprob for r in rows):
        logprob_info = _logprobs(logits, rows)

    greedy = [r.params.greedy for r in rows]
    if all(greedy):
        return logits.argmax(-1).tolist(), _pick(logprob_info, logits.argmax(-1))

    device = logits.device
    temps = torch.tensor(
        [r.params.temperature if not g else 1.0 for r, g in zip(rows, greedy, strict=True)],
        device=device,
    )
    probs = torch.softmax(logits / temps[:, None], dim=-1)
    if any(r.params.top_k > 0 or r.params.top_p < 1 or r.params.min_p > 0 for r in rows):
        probs = _filter(probs, rows)
    noise = torch.empty_like(probs).exponential_(generator=shared)
    seeded = [i for i, r in enumerate(rows) if r.generator is not None]
    if seeded:  # each from its own CPU generator, then one copy for all of them
        own = torch.empty(len(seeded), probs.shape[1])
        for j, i in enumerate(seeded):
            own[j].exponential_(generator=rows[i].generator)
        noise[torch.tensor(seeded).to(device)] = own.to(device)
    sampled = (probs / noise).argmax(-1)
    if any(greedy):
        g = torch.tensor(greedy, device=device)
        sampled = torch.where(g, logits.argmax(-1), sampled)
    return sampled.tolist(), _pick(logprob_info, sampled)


def _filter(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    device = probs.device
    top_k, top_p, min_p = (
        torch.tensor(
            [
                (
                    r.params.top_k if r.params.top_k > 0 else probs.shape[1],
                    r.params.top_p,
                    r.params.min_p,
                )
                for r in rows
            ],
            dtype=torch.float32,  # top_k stays exact below 2**24
        )
        .to(device)
        .unbind(1)
    )
    sorted_p, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[1], device=device)[None, :]
    drop = rank >= top_k[:, None]
    # keep the smallest set whose mass reaches top_p (the token crossing it is kept)
    drop |= (sorted_p.cumsum(-1) - sorted_p) > top_p[:, None]
    drop |= sorted_p < (min_p * sorted_p[:, 0])[:, None]
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_p)


def _logprobs(logits: torch.Tensor, rows: list[SamplingRow]):
    lp = torch.log_softmax(logits, dim=-1)
    k = max((r.top_logprobs_num for r in rows), default=0)
    top = lp.topk(k, dim=-1) if k else None
    return lp, top


def _pick(info, chosen: torch.Tensor):
    if info is None:
        return None
    lp, top = info
    chosen_lp = lp.gather(1, chosen[:, None])[:, 0].tolist()
    # whole tensors to the host at once, not a row at a time
    ids, values = (top.indices.tolist(), top.values.tolist()) if top is not None else ([], [])
    out = []
    for i, c in enumerate(chosen_lp):
        alts = list(zip(ids[i], values[i], strict=True)) if top is not None else []
        out.append((c, alts))
    return out


def token_logprobs(
    logits: torch.Tensor, targets: list[int], top_n: int
) -> list[tuple[float, list[tuple[int, float]]]]:
    """Each row's logprob of its target token, with the row's top `top_n` alternatives:
    prompt logprobs, which score given tokens under the raw model (no penalties, no grammar:
    nothing was sampled there)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = torch.tensor(targets, dtype=torch.int64, device=lp.device)
    top = lp.topk(top_n, dim=-1) if top_n else None
    return _pick((lp, top), chosen)


def distribution(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    """The normalised distribution each row of `logits` would be sampled from under `row`'s
    temperature, top_k, top_p and min_p (speculative verification needs the probabilities
    themselves, where `sample` only draws)."""
    rows = [row] * logits.shape[0]
    probs = torch.softmax(logits / row.params.temperature, dim=-1)
    if row.params.top_k > 0 or row.params.top_p < 1 or row.params.min_p > 0:
        probs = _filter(probs, rows)
    return probs / probs.sum(-1, keepdim=True)
