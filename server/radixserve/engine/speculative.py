"""Speculative decoding inside continuous batching: drafts from a proposer (n-gram prompt
lookup, or a smaller draft model), verified by one forward of the target model, accepted
so that outputs keep the target's distribution exactly.

A decoding request with drafts d1..dk runs as a k+1-token extend (its last token and the
drafts) in the same forward as everyone else. Greedy rows accept drafts while they equal
the target's argmax; sampled rows use the rejection rule for a point-mass draft: accept d
with probability p(d), else draw from p with d removed. Both proposers choose their drafts
deterministically from the sequence (the draft model greedily), so the point-mass rule is
the exact one. Either way one token more than the accepted drafts comes out (the target's
own next token), and the rejected drafts' KV slots go back to the pool.

Penalties, logit bias, min_tokens and grammars shape each drafted position's logits as
plain decoding would shape them after the drafts before it; a grammar also cuts a draft at
the first token it forbids, before any compute is spent on it.

Where it does not pay, it stays off (`Speculation.should_propose`): in batches of more
than --speculative-max-batch-size decoding requests (verification then competes for the
compute the batch already uses), and for a request whose recent drafts were mostly
rejected (it is probed again now and then, since text changes).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from radixserve.engine.sampler import SamplingRow, apply_penalties, distribution

if TYPE_CHECKING:
    from radixserve.config import ServerArgs
    from radixserve.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# a request whose drafts' acceptance (moving average) falls below this stops drafting...
MIN_ACCEPT_RATE = 0.25
EMA = 0.5  # weight of the newest attempt in that average
PROBE_EVERY = 8  # ...and tries again after this many plain steps


@dataclass
class SpecState:
    """Per request: the drafts of this step and how well its drafts have done; with a
    draft model, also the slots of the request's KV in the draft model's pool."""

    drafts: list[int]
    accept_rate: float = 1.0
    idle_steps: int = 0
    draft_slots: torch.Tensor | None = None


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

    def propose_batch(self, seqs: list[list[int]], states: list[SpecState], rooms: list[int]):
        return [self.propose(ids, k) for ids, k in zip(seqs, rooms, strict=True)]

    def commit(self, state: SpecState, length: int, accepted: int) -> None:
        """Nothing to keep between steps."""

    def release(self, state: SpecState) -> None:
        """Nothing held."""


class DraftModelProposer:
    """STANDALONE: a smaller model of the same vocabulary drafts greedily, over its own KV
    pool. A step drafts for all drafting requests together: one extend that brings each
    request's draft KV up to its sequence (usually the one token the target added), then one
    decode forward per further drafted position.

    The draft KV of accepted drafts is kept (it holds exactly the tokens the sequence now
    has); the rest is freed after verification. A request that is retracted or finishes
    gives all of it back; one that the pool cannot hold simply does not draft."""

    def __init__(self, runner: ModelRunner, chunk: int) -> None:
        self.runner = runner
        self.pool = runner.pool
        self.chunk = chunk  # most tokens of one request's catch-up per step

    def propose_batch(
        self, seqs: list[list[int]], states: list[SpecState], rooms: list[int]
    ) -> list[list[int]]:
        from radixserve.layers.attention import ForwardBatch

        drafts: list[list[int]] = [[] for _ in seqs]
        live: list[int] = []  # indices that got their catch-up slots
        new_slots: list[torch.Tensor] = []
        for i, (ids, st) in enumerate(zip(seqs, states, strict=True)):
            have = 0 if st.draft_slots is None else st.draft_slots.numel()
            if have >= len(ids):  # never expected: the sequence lost tokens; start over
                self.release(st)
                have = 0
            # a long prompt catches up a chunk a step, as the target's prefill does
            new = self.pool.alloc(min(len(ids) - have, self.chunk))
            if new is None:
                self.release(st)  # what it held goes to the others; it decodes plainly
                continue
            old = st.draft_slots if st.draft_slots is not None else new[:0]
            st.draft_slots = torch.cat([old, new])
            live.append(i)
            new_slots.append(new)
        if not live:
            return drafts
        device = self.runner.device
        # the catch-up extend: each request's tokens the draft KV does not hold yet
        ids_flat: list[int] = []
        pos: list[int] = []
        prefix, extend, rows = [], [], []
        done: list[int] = []  # caught up: these draft this step
        for i, new in zip(live, new_slots, strict=True):
            end = states[i].draft_slots.numel()
            have = end - new.numel()
            ids_flat += seqs[i][have:end]
            pos += range(have, end)
            prefix.append(have)
            extend.append(end - have)
            if end == len(seqs[i]):
                done.append(i)
                rows.append(len(ids_flat) - 1)
        batch = ForwardBatch(
            input_ids=torch.tensor(ids_flat, dtype=torch.int64, device=device),
            positions=torch.tensor(pos, dtype=torch.int64, device=device),
            out_cache_loc=torch.cat(new_slots).to(device),
            kv_pool=self.pool,
            num_prefill_reqs=len(live),
            num_prefill_tokens=len(ids_flat),
            prefix_lens=prefix,
            extend_lens=extend,
            req_slots=[states[i].draft_slots for i in live],
        )
        rows_t = torch.tensor(rows, dtype=torch.int64, device=device)
        tokens = self.runner.forward(batch, rows_t).argmax(-1).tolist()
        for i, t in zip(done, tokens, strict=True):
            drafts[i].append(t)
        live = done
        # then one decode forward per further position, for those with room left
        step = 1
        while True:
            live = [i for i in live if rooms[i] > step]
            if not live:
                break
            new = self.pool.alloc(len(live))
            if new is None:
                break
            pos_now = [len(seqs[i]) + step - 1 for i in live]
            for i, s in zip(live, new.split(1), strict=True):
                states[i].draft_slots = torch.cat([states[i].draft_slots, s])
            batch = ForwardBatch(
                input_ids=torch.tensor(
                    [drafts[i][-1] for i in live], dtype=torch.int64, device=device
                ),
                positions=torch.tensor(pos_now, dtype=torch.int64, device=device),
                out_cache_loc=new.to(device),
                kv_pool=self.pool,
                num_prefill_reqs=0,
                num_prefill_tokens=0,
                prefix_lens=pos_now,
                extend_lens=[1] * len(live),
                req_slots=[states[i].draft_slots for i in live],
            )
            rows = torch.arange(len(live), device=device)
            tokens = self.runner.forward(batch, rows).argmax(-1).tolist()
            for i, t in zip(live, tokens, strict=True):
                drafts[i].append(t)
            step += 1
        return drafts

    def commit(self, state: SpecState, length: int, accepted: int) -> None:
        """After verification of a sequence that was `length` tokens long: keep the draft KV
        of the sequence and of the accepted drafts, free that of the rejected ones."""
        if state.draft_slots is None:
            return
        keep = min(state.draft_slots.numel(), length + accepted)
        if keep < state.draft_slots.numel():
            self.pool.free(state.draft_slots[keep:])
            state.draft_slots = state.draft_slots[:keep]

    def release(self, state: SpecState) -> None:
        if state.draft_slots is not None:
            self.pool.free(state.draft_slots)
            state.draft_slots = None


def build_draft_runner(args: ServerArgs, target: ModelRunner) -> ModelRunner:
    """The draft model of --speculative-draft-model-path, in the target's dtype choice with
    its own quantization choice, and a KV pool of as many tokens as the target's (the draft
    is smaller, so it costs less memory)."""
    from radixserve.engine.model_runner import ModelRunner

    draft_args = dataclasses.replace(
        args,
        model_path=args.speculative_draft_model_path,
        quantization=args.speculative_draft_model_quantization,
        max_total_tokens=target.max_total_tokens,
        speculative_algorithm=None,
        speculative_draft_model_path=None,
        enable_lora=False,
        lora_paths=None,
        disable_cuda_graph=True,
        context_length=target.context_length,
    )
    runner = ModelRunner(draft_args)
    check_draft_vocab(runner, target)
    logger.info(
        "draft model %s: %s, quantization %s, KV pool %d tokens",
        runner.source.path,
        str(runner.dtype).removeprefix("torch."),
        runner.quantization,
        runner.max_total_tokens,
    )
    return runner


def check_draft_vocab(draft: ModelRunner, target: ModelRunner) -> None:
    """Draft token ids index the target's logits: the vocabularies must be the same."""
    if draft.vocab_size != target.vocab_size:
        raise ValueError(
            f"--speculative-draft-model-path: the draft model's vocabulary has "
            f"{draft.vocab_size} tokens, the target's {target.vocab_size}; a draft model "
            "must share the target's tokenizer"
        )


class Speculation:
    def __init__(
        self,
        num_draft_tokens: int,
        min_n: int,
        max_n: int,
        max_batch: int,
        draft_runner: ModelRunner | None = None,
        chunk: int = 2048,
    ) -> None:
        self.k = num_draft_tokens
        self.max_batch = max_batch
        self.proposer: NgramProposer | DraftModelProposer = (
            NgramProposer(min_n, max_n)
            if draft_runner is None
            else DraftModelProposer(draft_runner, chunk)
        )

    def describe(self, args: ServerArgs) -> dict[str, object]:
        """What /server_info shows: the algorithm, k, the gate, and the draft model."""
        info: dict[str, object] = {
            "algorithm": args.speculative_algorithm,
            "num_draft_tokens": self.k,
            "max_batch_size": self.max_batch,
        }
        if isinstance(self.proposer, DraftModelProposer):
            r = self.proposer.runner
            info.update(
                draft_model=r.source.path,
                draft_dtype=str(r.dtype).removeprefix("torch."),
                draft_quantization=r.quantization,
                draft_kv_tokens=r.max_total_tokens,
            )
        return info

    @staticmethod
    def eligible(row: SamplingRow) -> bool:
        """Seeded sampling decodes one token a step: its draws must repeat the seed's
        sequence whatever shares the batch, and how many draws a verification makes
        depends on the batch (the batch gate below)."""
        return row.generator is None or row.params.greedy

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

    def propose(self, seqs: list[list[int]], states: list[SpecState], rooms: list[int]):
        return self.proposer.propose_batch(seqs, states, rooms)

    def record(self, state: SpecState, drafted: int, accepted: int) -> None:
        state.accept_rate = (1 - EMA) * state.accept_rate + EMA * accepted / drafted


def cut_by_grammar(row: SamplingRow, drafts: list[int]) -> list[int]:
    """The drafts up to the first one the request's grammar forbids (or one that would end
    it: the target's own token ends it instead). The matcher is left as it was."""
    m = row.grammar
    if m is None or not drafts:
        return drafts
    fed = 0
    for d in drafts:
        if not m.accept_token(d):
            break
        fed += 1
        if m.is_terminated():
            break
    if fed and m.is_terminated():
        fed -= 1  # keep the terminating token out of the drafts
        m.rollback(1)
    if fed:
        m.rollback(fed)
    return drafts[:fed]


def shape_logits(logits: torch.Tensor, row: SamplingRow, drafts: list[int]) -> torch.Tensor:
    """Each verify row's logits as plain decoding would see them at that position: penalties,
    bias and min_tokens over the output so far plus the drafts before it, and the grammar's
    mask in the state those drafts lead to. In place on a float32 copy."""
    logits = logits.float().clone()
    p = row.params
    if p.has_penalties or p.logit_bias or len(row.output_ids) < p.min_new_tokens:
        views = [
            dataclasses.replace(row, output_ids=row.output_ids + drafts[:i])
            for i in range(len(drafts) + 1)
        ]
        apply_penalties(logits, views)
    if row.grammar is not None:
        import xgrammar as xgr

        m = row.grammar
        bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])
        fed = 0
        for i in range(logits.shape[0]):
            m.fill_next_token_bitmask(bitmask, i)
            if i < len(drafts):
                if not m.accept_token(drafts[i]):  # cut_by_grammar ran before: never
                    raise RuntimeError("a draft the grammar forbids reached verification")
                fed += 1
        if fed:
            m.rollback(fed)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device))
    return logits


def verify(
    logits: torch.Tensor, row: SamplingRow, drafts: list[int], gen: torch.Generator | None
) -> tuple[list[int], int, torch.Tensor]:
    """The tokens a request emits this step (accepted drafts, then the target's own next
    token), how many drafts were accepted, and the shaped logits the choices were made from
    (logprobs are read from them). `logits` holds one row per position: the last token's,
    then each draft's."""
    logits = shape_logits(logits, row, drafts)
    if row.params.greedy:
        best = logits.argmax(-1).tolist()
        n = 0
        while n < len(drafts) and drafts[n] == best[n]:
            n += 1
        return drafts[:n] + [best[n]], n, logits
    probs = distribution(logits, row)
    gen = row.generator or gen
    for i, d in enumerate(drafts):
        u = torch.rand(1, generator=gen, device=probs.device).item()
        if u < probs[i, d].item():
            continue
        rest = probs[i].clone()
        rest[d] = 0.0
        tok = torch.multinomial(rest / rest.sum(), 1, generator=gen).item()
        return drafts[:i] + [tok], i, logits
    return drafts + [torch.multinomial(probs[-1], 1, generator=gen).item()], len(drafts), logits
