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
    """Logit bias, frequency/presence/repetition penalties and min_new_tokens, in place."""
    vocab, device = logits.shape[-1], logits.device
    for i, r in enumerate(rows):
        p = r.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.int64, device=device)
            logits[i, ids] += torch.tensor(
                list(p.logit_bias.values()), dtype=logits.dtype, device=device
            )
        if p.has_penalties:
            out = torch.tensor(r.output_ids, dtype=torch.int64, device=device)
            counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
            if p.frequency_penalty:
                logits[i] -= p.frequency_penalty * counts
            if p.presence_penalty:
                logits[i] -= p.presence_penalty * (counts > 0).to(logits.dtype)
            if p.repetition_penalty != 1.0:
                seen = torch.zeros(vocab, dtype=torch.bool, device=device)
                seen[
                    torch.tensor(r.prompt_ids + r.output_ids, dtype=torch.int64, device=device)
                ] = True
                row = logits[i]
                penalised = torch.where(
                    row > 0, row / p.repetition_penalty, row * p.repetition_penalty
                )
                logits[i] = torch.where(seen.to(row.device), penalised, row)
        if len(r.output_ids) < p.min_new_tokens and r.stop_ids:
            logits[i, torch.tensor(r.stop_ids, dtype=torch.int64, device=device)] = float("-inf")
    return logits


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
    for i, r in enumerate(rows):
        if r.generator is not None:
            noise[i] = (
                torch.empty(probs.shape[1], device="cpu")
                .exponential_(generator=r.generator)
                .to(device)
            )
    sampled = (probs / noise).argmax(-1)
    if any(greedy):
        g = torch.tensor(greedy, device=device)
        sampled = torch.where(g, logits.argmax(-1), sampled)
    return sampled.tolist(), _pick(logprob_info, sampled)


def _filter(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    device = probs.device
    top_k = torch.tensor(
        [r.params.top_k if r.params.top_k > 0 else probs.shape[1] for r in rows], device=device
    )
    top_p = torch.tensor([r.params.top_p for r in rows], device=device)
    min_p = torch.tensor([r.params.min_p for r in rows], device=device)
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
    out = []
    for i, c in enumerate(chosen_lp):
        alts = []
        if top is not None:
            alts = list(zip(top.indices[i].tolist(), top.values[i].tolist(), strict=True))
        out.append((c, alts))
    return out
