"""Speculative decoding inside continuous batching: n-gram (prompt lookup) proposals,
verified by one forward of the target model, accepted so that outputs keep the target's
distribution exactly.

A decoding request with drafts d1..dk runs as a k+1-token extend (its last token and the
drafts) in the same forward as everyone else. Greedy rows accept drafts while they equal
the target's argmax; sampled rows use the rejection rule for a point-mass draft: accept d
with probability p(d), else draw from p with d removed. Either way one token more than the
accepted drafts comes out (the target's own next token), and the rejected drafts' KV slots
go back to the pool.

Where it does not pay, it stays off (`Speculation.should_propose`): in batches of more
than --speculative-max-batch-size decoding requests (verification then competes for the
compute the batch already uses), and for a request whose recent drafts were mostly
rejected (it is probed again now and then, since text changes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixserve.engine.sampler import SamplingRow, distribution

# a request whose drafts' acceptance (moving average) falls below this stops drafting...
MIN_ACCEPT_RATE = 0.25
EMA = 0.5  # weight of the newest attempt in that average
PROBE_EVERY = 8  # ...and tries again after this many plain steps


@dataclass
class SpecState:
    """Per request: the drafts of this step and how well its drafts have done."""

    drafts: list[int]
    accept_rate: float = 1.0
    idle_steps: int = 0


class NgramProposer:
    """Prompt lookup: find the earlier occurrence that shares the longest suffix with the
    sequence (up to max_n tokens, at least min_n; the latest among equals) and propose the
    tokens that followed it.

    One backward pass over the sequence, comparing ints, for every decode step of every
    drafting request: slicing a window per candidate start and length cost milliseconds a
    step on 2,000-token sequences."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, ids: list[int], k: int) -> list[int]:
        end = len(ids)
        if k <= 0 or end < 2:
            return []
        last = ids[-1]
        best_n, best_follow = 0, 0
        # j: an earlier position of the last token, so something follows it
        for j in range(end - 2, -1, -1):
            if ids[j] != last:
                continue
            n = 1
            while n < self.max_n and n <= j and ids[j - n] == ids[end - 1 - n]:
                n += 1
            if n > best_n:
                best_n, best_follow = n, j + 1
                if n == self.max_n:
                    break
        if best_n < self.min_n:
            return []
        return ids[best_follow : best_follow + k]


class Speculation:
    def __init__(self, num_draft_tokens: int, min_n: int, max_n: int, max_batch: int) -> None:
        self.k = num_draft_tokens
        self.max_batch = max_batch
        self.proposer = NgramProposer(min_n, max_n)

    @staticmethod
    def eligible(row: SamplingRow) -> bool:
        """Requests whose next-token distribution does not depend on the tokens drafted
        before it, and whose draws need not repeat a seed's sequence: no penalties, bias,
        pending min_tokens, grammar or seed (those decode one token a step)."""
        p = row.params
        return not (
            p.has_penalties
            or p.logit_bias
            or len(row.output_ids) < p.min_new_tokens
            or row.grammar is not None
            or (row.generator is not None and not p.greedy)
        )

    def should_propose(self, state: SpecState, batch: int) -> bool:
        if batch > self.max_batch:
            return False
        if state.accept_rate >= MIN_ACCEPT_RATE:
            return True
        state.idle_steps += 1
        if state.idle_steps >= PROBE_EVERY:
            state.idle_steps, state.accept_rate = 0, MIN_ACCEPT_RATE
            return True
        return False

    def record(self, state: SpecState, drafted: int, accepted: int) -> None:
        state.accept_rate = (1 - EMA) * state.accept_rate + EMA * accepted / drafted


def verify(
    logits: torch.Tensor, row: SamplingRow, drafts: list[int], gen: torch.Generator | None
) -> tuple[list[int], int]:
    """The tokens a request emits this step (accepted drafts, then the target's own next
    token) and how many drafts were accepted. `logits` holds one row per position: the
    last token's, then each draft's."""
    if row.params.greedy:
        best = logits.argmax(-1).tolist()
        n = 0
        while n < len(drafts) and drafts[n] == best[n]:
            n += 1
        return drafts[:n] + [best[n]], n
    probs = distribution(logits.float(), row)
    gen = row.generator or gen
    for i, d in enumerate(drafts):
        u = torch.rand(1, generator=gen, device=probs.device).item()
        if u < probs[i, d].item():
            continue
        rest = probs[i].clone()
        rest[d] = 0.0
        tok = torch.multinomial(rest / rest.sum(), 1, generator=gen).item()
        return drafts[:i] + [tok], i
    return drafts + [torch.multinomial(probs[-1], 1, generator=gen).item()], len(drafts)
