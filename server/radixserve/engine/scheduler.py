"""Continuous batching over a paged KV pool with a radix prefix cache (SGLang's shape).

Every step:
1. decoding requests each get one slot; when the pool (after evicting unreferenced cache)
   cannot give them, the newest are retracted: their KV goes back to the cache and they
   re-queue at the front with their output kept;
2. the rest of the step's token budget prefills: first the request whose prompt is mid-
   chunk, then waiting requests (longest cached prefix first under `lpm`), while the batch
   cap, the budget and KV memory (with headroom for the running requests' decoding) allow;
3. one forward runs prefill chunks and decode tokens together; requests that reached the
   end of their prompt or decoded sample one token each and are checked for a stop.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from radixserve.config import ServerArgs
from radixserve.engine.io_struct import (
    EngineStats,
    FinishAbort,
    FinishLength,
    FinishReason,
    FinishStop,
    LoadLoraReq,
    LoraReply,
    ReqOutput,
    TokenizedGenerateReq,
    UnloadLoraReq,
)
from radixserve.engine.lora import LoraError
from radixserve.engine.model_runner import ModelRunner
from radixserve.engine.radix_cache import NoPrefixCache, RadixCache, TreeNode
from radixserve.engine.sampler import SamplingRow, sample, token_logprobs
from radixserve.engine.speculative import (
    SpecState,
    Speculation,
    build_draft_runner,
    cut_by_grammar,
    verify,
)
from radixserve.layers.attention import ForwardBatch

logger = logging.getLogger(__name__)

# Admission keeps room for this share of the running requests' remaining max_new_tokens;
# too low and requests are retracted soon after admission, too high and the pool idles.
NEW_TOKEN_RATIO = 0.3
MAX_RESERVE_PER_REQ = 1024
LPM_MAX_WAITING = 128  # beyond this, prefix matching every waiting request costs too much
KV_TOO_SMALL = "KV cache too small for this request"
ABORTED = FinishAbort("aborted")
# a waiting prompt whose next this-many uncached tokens equal those of a prompt being
# prefilled waits for that prefill to land in the radix cache (SGLang uses 32 as well)
IN_BATCH_PREFIX_TOKENS = 32


@dataclass
class Req:
    rid: str
    origin_input_ids: list[int]
    row: SamplingRow
    stream: bool
    arrival: int
    output_ids: list[int] = field(default_factory=list)
    slots: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    prefix_len: int = 0  # leading slots owned by the radix tree (locked through last_node)
    last_node: TreeNode | None = None
    cache_namespace: Hashable = None  # the radix tree shares prefixes only within one
    priority: int = 0  # lower is more urgent (--enable-priority-scheduling)
    # prompt logprobs: the first prompt position asked for (-1: none), and what is computed
    prompt_lp_start: int = -1
    prompt_logprobs: list = field(default_factory=list)
    prompt_lp_sent: bool = False
    spec: SpecState | None = None  # speculative decoding: this step's drafts, acceptance
    lora_name: str | None = None  # its adapter; None = the base model
    lora_slot: int | None = None  # the adapter's weight slot, pinned while it runs
    # first admission is recorded once (queue time, prefix-cache hits, prompt tokens): a
    # retracted request that is admitted again keeps what it reported
    admitted: bool = False
    cached_tokens: int = 0
    arrived: float = field(default_factory=time.monotonic)
    queue_time: float | None = None
    queue_time_sent: bool = False
    finished_reason: FinishReason | None = None
    sent_len: int = 0
    logprobs: list = field(default_factory=list)

    @property
    def fill_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids

    @property
    def prompt_lp_pending(self) -> bool:
        """Prompt logprobs asked for and not all computed: its prefill must compute the
        positions they need instead of reading them from the prefix cache."""
        want = len(self.origin_input_ids) - self.prompt_lp_start
        return self.prompt_lp_start >= 0 and len(self.prompt_logprobs) < want

    def cache_key(self) -> list[int]:
        """What the prefix cache may serve: all but the last token (it must be computed for
        the first sample), and nothing past the first position prompt logprobs need."""
        if self.prompt_lp_pending:
            return self.fill_ids[: max(self.prompt_lp_start, 1) - 1]
        return self.fill_ids[:-1]

    @property
    def params(self):
        return self.row.params


def _shares_uncached(req: Req, cached: int, pending: list[Req]) -> bool:
    """Whether `req`'s prompt, beyond its `cached` tokens, starts like one of the `pending`
    prompts of its cache namespace for at least IN_BATCH_PREFIX_TOKENS tokens (which a
    prefill of those puts in the cache)."""
    end = cached + IN_BATCH_PREFIX_TOKENS
    fill = req.fill_ids
    if len(fill) <= end:
        return False
    window = fill[cached:end]
    return any(
        p.cache_namespace == req.cache_namespace
        and len(p.fill_ids) > end
        and p.fill_ids[cached:end] == window
        for p in pending
    )


class Scheduler:
    """Reads top to bottom as a request lives: state, admission, the step, finish."""

    # ---- state: the queues, and requests in and out --------------------------------------
    def __init__(
        self,
        args: ServerArgs,
        runner: ModelRunner,
        tokenizer,
        eos_ids: list[int],
        draft_runner: ModelRunner | None = None,
    ) -> None:
        self.args = args
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.pool = runner.pool
        cache = NoPrefixCache if args.disable_radix_cache else RadixCache
        self.cache: RadixCache | NoPrefixCache = cache(self.pool.free)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.chunked: Req | None = None
        self.arrivals = 0
        self.chunk_size = (
            args.chunked_prefill_size if args.chunked_prefill_size > 0 else args.max_prefill_tokens
        )
        self.prefill_budget = min(self.chunk_size, args.max_prefill_tokens)
        self.stats = EngineStats(kv_total_tokens=self.pool.size)
        self.shared_gen = torch.Generator(device=runner.device).manual_seed(args.random_seed)
        self.finished_outputs: list[ReqOutput | LoraReply] = []
        self.lora = runner.lora
        self.pending_unloads: list[UnloadLoraReq] = []  # waiting for their requests to end
        self.grammar_wait: list[tuple[Req, Future]] = []  # compiling off the loop
        self.spec: Speculation | None = None
        if args.speculative_algorithm is not None:
            if args.speculative_algorithm == "STANDALONE" and draft_runner is None:
                draft_runner = build_draft_runner(args, runner)
            self.spec = Speculation(
                args.speculative_num_draft_tokens,
                args.speculative_ngram_min_match_window_size,
                args.speculative_ngram_max_match_window_size,
                args.speculative_max_batch_size,
                draft_runner if args.speculative_algorithm == "STANDALONE" else None,
                self.chunk_size,
            )
        self._grammar_backend = None

    def has_work(self) -> bool:
        return bool(
            self.waiting
            or self.running
            or self.finished_outputs
            or self.grammar_wait
            or self.pending_unloads
        )

    def add_request(self, msg: TokenizedGenerateReq) -> None:
        p = msg.sampling_params
        gen = None
        if p.seed is not None and not p.greedy:
            gen = torch.Generator().manual_seed(p.seed % (2**63))
        stop_ids = [] if p.ignore_eos else list(self.eos_ids)
        stop_ids += p.stop_token_ids
        row = SamplingRow(
            p, msg.input_ids, [], stop_ids, gen, msg.top_logprobs_num, msg.return_logprob
        )
        req = Req(msg.rid, list(msg.input_ids), row, msg.stream, self.arrivals)
        req.priority = msg.priority
        if msg.return_logprob and 0 <= msg.logprob_start_len < len(msg.input_ids):
            req.prompt_lp_start = msg.logprob_start_len
            req.prompt_logprobs = [(None, [])] if msg.logprob_start_len == 0 else []
        # KV computed under an adapter is that adapter's, and a salted request shares cached
        # prefixes only with requests of its salt: both key the radix cache's namespace
        if msg.lora_name is not None or msg.cache_salt is not None:
            req.cache_namespace = (msg.lora_name, msg.cache_salt)
        row.output_ids = req.output_ids
        self.arrivals += 1
        why = self._reject_reason(req)
        if why is None and msg.lora_name is not None:
            if self.lora is None or not self.lora.usable(msg.lora_name):
                why = FinishAbort(f"LoRA adapter {msg.lora_name!r} is not loaded", status_code=404)
            else:
                req.lora_name = msg.lora_name
                self.lora.users[msg.lora_name] += 1
        if why is not None:
            self._finish(req, why)
            return
        if p.grammar is not None:
            self.grammar_wait.append((req, self.grammar_backend().submit(*p.grammar)))
            return
        self.waiting.append(req)

    def grammar_backend(self):
        if self._grammar_backend is None:
            from radixserve.engine.grammar import GrammarBackend

            self._grammar_backend = GrammarBackend(
                self.tokenizer, self.runner.vocab_size, self.eos_ids
            )
        return self._grammar_backend

    def abort(self, rid: str) -> None:
        for req, fut in self.grammar_wait:
            if req.rid == rid:
                self.grammar_wait.remove((req, fut))
                self._finish(req, ABORTED)
                return
        for req in list(self.waiting):
            if req.rid == rid:
                self.waiting.remove(req)
                self._finish(req, ABORTED)
                return
        for req in self.running:
            if req.rid == rid and req.finished_reason is None:
                self.running.remove(req)
                if self.chunked is req:
                    self.chunked = None
                self._finish(req, ABORTED)
                return

    def flush_cache(self) -> bool:
        """Drop the prefix cache; refused while requests hold slots (SGLang does the same)."""
        if self.running or self.waiting:
            return False
        self.cache.reset()
        self.pool.clear()
        return True

    # ---- admission: who joins the batch --------------------------------------------------
    def _reject_reason(self, req: Req) -> FinishReason | None:
        n = len(req.origin_input_ids)
        if n == 0:
            return FinishAbort("empty prompt")
        if req.params.max_new_tokens == 0 and req.prompt_lp_start < 0:
            return FinishLength()  # nothing to compute (with prompt logprobs: the prompt)
        if n >= self.runner.context_length:
            return FinishAbort(
                f"prompt of {n} tokens does not fit the context length {self.runner.context_length}"
            )
        if n + 1 > self.pool.size:
            return FinishAbort(
                f"prompt of {n} tokens does not fit the KV cache of {self.pool.size} tokens"
            )
        bad = [t for t in req.origin_input_ids if not 0 <= t < self.runner.vocab_size]
        if bad:
            return FinishAbort(f"token id {bad[0]} is outside the vocabulary")
        return None

    def _admit_compiled(self) -> None:
        """Requests whose grammar finished compiling join the queue (or fail with a 400)."""
        still = []
        for req, fut in self.grammar_wait:
            if not fut.done():
                still.append((req, fut))
            elif fut.exception() is not None:
                self._finish(req, FinishAbort(str(fut.exception()), status_code=400))
            else:
                req.row.grammar = self._grammar_backend.matcher(fut.result())
                self.waiting.append(req)
        self.grammar_wait = still

    def _schedule_prefill(self) -> list[tuple[Req, int]]:
        """(request, tokens to compute this step) for the prefill part of the batch."""
        budget = self.prefill_budget
        chosen: list[tuple[Req, int]] = []
        if self.chunked is not None:
            chunk = self._continue_chunk(budget)
            if chunk is None:
                return chosen
            chosen.append(chunk)
            budget -= chunk[1]
        if self.chunked is not None or not self.waiting:
            return chosen
        self._order_waiting()
        running = len(self.running)
        reserve = self._reserve(self.running)
        # prompts whose KV this step computes: cached in the tree only once their prefill ends
        pending = [r for r, _ in chosen]
        deferred: list[Req] = []
        while self.waiting and budget > 0 and running < self.args.max_running_requests:
            req = self.waiting[0]
            prefix, node = self.cache.match_prefix(req.cache_key(), req.cache_namespace)
            if self.cache.reuses_prefixes and _shares_uncached(req, prefix.numel(), pending):
                # the same uncached prefix is being computed for another request: wait a
                # step and take it from the cache instead of computing it twice
                deferred.append(self.waiting.popleft())
                self.stats.prefix_deferrals += 1
                continue
            reserve += self._reserve([req])
            alone = not self.running and not chosen
            n = self._try_admit(req, prefix, node, budget, reserve, alone)
            if n is None:
                break
            self.waiting.popleft()
            chosen.append((req, n))
            pending.append(req)
            budget -= n
            running += 1
            if self.chunked is req:
                break
        self.waiting.extendleft(reversed(deferred))  # back at the front, in their order
        return chosen

    def _continue_chunk(self, budget: int) -> tuple[Req, int] | None:
        """Slots for the next chunk of the prompt mid-prefill; None when memory is short."""
        req = self.chunked
        n = min(len(req.fill_ids) - req.slots.numel(), budget)
        new = self._alloc(n)
        if new is None:
            if self.running == [req]:
                self.running.remove(req)
                self.chunked = None
                self._finish(req, FinishAbort(KV_TOO_SMALL))
            return None
        req.slots = torch.cat([req.slots, new])
        self.chunked = req if req.slots.numel() < len(req.fill_ids) else None
        return req, n

    def _try_admit(
        self,
        req: Req,
        prefix: torch.Tensor,
        node: TreeNode | None,
        budget: int,
        reserve: int,
        alone: bool,
    ) -> int | None:
        """The admission rule: `req` joins the batch when its uncached prompt (up to `budget`
        tokens this step) fits in KV memory with `reserve` tokens kept for the running
        requests' decoding, or when it is `alone` (nothing else would run). Returns the tokens to compute,
        or None (and changes nothing) when it does not fit."""
        if req.lora_name is not None:
            # every adapter slot is pinned by running requests: wait for one to finish
            req.lora_slot = self.lora.acquire(req.lora_name)
            if req.lora_slot is None:
                return None
        self.cache.inc_lock_ref(node)  # before _alloc, whose eviction must spare it
        n = min(len(req.fill_ids) - prefix.numel(), budget)
        new = None
        if self._available() >= n + reserve or alone:
            new = self._alloc(n)
        if new is None:
            self.cache.dec_lock_ref(node)
            self._release_lora(req)
            return None
        req.slots = torch.cat([prefix, new])
        req.prefix_len, req.last_node = prefix.numel(), node
        if not req.admitted:
            req.admitted = True
            req.queue_time = time.monotonic() - req.arrived
            req.cached_tokens = prefix.numel()
            self.stats.cache_hit_tokens += prefix.numel()
            self.stats.prompt_tokens += len(req.origin_input_ids)
        self.running.append(req)
        if req.slots.numel() < len(req.fill_ids):
            self.chunked = req
        return n

    def _order_waiting(self) -> None:
        """The admission order: priority first (under --enable-priority-scheduling), then
        retracted requests (which have output) ahead of fresh ones, then the longest cached
        prefix (lpm), then arrival."""
        by_priority = self.args.enable_priority_scheduling
        lpm = (
            self.args.schedule_policy == "lpm"
            and self.cache.reuses_prefixes
            and len(self.waiting) <= LPM_MAX_WAITING
        )
        if not (by_priority or lpm):
            return

        def key(r: Req) -> tuple:
            if r.output_ids:
                cached = float("-inf")
            elif lpm:
                cached = -self.cache.match_prefix(r.cache_key(), r.cache_namespace)[0].numel()
            else:
                cached = 0
            return (r.priority if by_priority else 0, cached, r.arrival)

        self.waiting = deque(sorted(self.waiting, key=key))

    def _alloc(self, n: int) -> torch.Tensor | None:
        if self.pool.available() < n:
            self.cache.evict(n - self.pool.available())
        return self.pool.alloc(n)

    def _available(self) -> int:
        return self.pool.available() + self.cache.evictable_size

    def _reserve(self, reqs) -> int:
        return int(
            sum(min(r.params.max_new_tokens - len(r.output_ids), MAX_RESERVE_PER_REQ) for r in reqs)
            * NEW_TOKEN_RATIO
        )

    # ---- one step: decode slots, retraction, the forward ---------------------------------
    def step(self) -> list[ReqOutput]:
        start = time.perf_counter()
        stats = self.stats
        inner = stats.time_forward_s + stats.time_sample_s + stats.time_output_s
        if self.grammar_wait:
            self._admit_compiled()
        if self.args.enable_priority_scheduling and self.waiting and self.running:
            self._preempt_for_priority()
        decode = self._schedule_decode()
        if self.spec is not None:
            self._propose(decode)
        prefill = self._schedule_prefill()
        if prefill or decode:
            self._run(prefill, decode)
        elif self.grammar_wait and not self.waiting:
            time.sleep(0.001)  # only compiles are pending: don't spin the core they need
        elif self.waiting and not self.running:
            # nothing holds memory and still the head request cannot start: it never will
            self._finish(self.waiting.popleft(), FinishAbort(KV_TOO_SMALL))
        t_out = time.perf_counter()
        outputs, self.finished_outputs = self.finished_outputs, []
        for req in self.running:
            if req.stream and len(req.output_ids) - req.sent_len >= self.args.stream_interval:
                outputs.append(self._output(req))
        stats.time_output_s += time.perf_counter() - t_out
        self.running = [r for r in self.running if r.finished_reason is None]
        if self.pending_unloads:
            self._finish_unloads()
        self._update_stats()
        inner = stats.time_forward_s + stats.time_sample_s + stats.time_output_s - inner
        stats.time_schedule_s += time.perf_counter() - start - inner
        return outputs

    def _schedule_decode(self) -> list[Req]:
        # a running request is either the one mid-chunk or decoding
        decode = self._retraction_order(r for r in self.running if r is not self.chunked)
        while decode:
            new = self._alloc(len(decode))
            if new is not None:
                for r, s in zip(decode, new.split(1), strict=True):
                    r.slots = torch.cat([r.slots, s])
                return decode
            victim = decode.pop()  # newest first
            if self.running == [victim]:
                # alone and still out of memory: its sequence is longer than the pool
                self.running.remove(victim)
                self._finish(victim, FinishLength())
                break
            self._retract(victim)
        return decode

    def _preempt_for_priority(self) -> None:
        """A waiting request more urgent than some running one does not wait for the batch to
        drain: while the batch is full (or memory is short for its prompt), the least urgent
        running request is retracted, its tokens kept, to resume after it."""
        head = min(self.waiting, key=lambda r: (r.priority, r.arrival))
        while True:
            full = len(self.running) >= self.args.max_running_requests
            if not (full or self._available() < len(head.fill_ids)):
                return
            victims = [r for r in self.running if r is not self.chunked]
            victim = self._retraction_order(victims)[-1] if victims else None
            if victim is None or victim.priority <= head.priority:
                return
            self._retract(victim)

    def _propose(self, decode: list[Req]) -> None:
        """Drafts for the decoding requests that speculation serves, each with KV slots for
        its drafts (none when the pool is short: it then decodes one token)."""
        picked: list[Req] = []
        rooms: list[int] = []
        for r in decode:
            if not self.spec.eligible(r.row):
                continue
            r.spec = r.spec or SpecState([])
            if not self.spec.should_propose(r.spec, len(decode)):
                continue
            room = min(
                self.spec.k,
                r.params.max_new_tokens - len(r.output_ids) - 1,
                self.runner.context_length - len(r.fill_ids) - 1,
            )
            if room > 0:
                picked.append(r)
                rooms.append(room)
        if not picked:
            return
        seqs = [r.fill_ids for r in picked]
        proposals = self.spec.propose(seqs, [r.spec for r in picked], rooms)
        for r, seq, drafts in zip(picked, seqs, proposals, strict=True):
            drafts = cut_by_grammar(r.row, drafts)
            new = self._alloc(len(drafts)) if drafts else None
            if new is not None:
                r.slots = torch.cat([r.slots, new])
                r.spec.drafts = drafts
            else:  # nothing to verify: the draft model keeps only the sequence's KV
                self.spec.proposer.commit(r.spec, len(seq), 0)

    def _drop_drafts(self, reqs: list[Req]) -> None:
        for r in reqs:
            if r.spec is not None and r.spec.drafts:
                self.pool.free(r.slots[-len(r.spec.drafts) :])
                r.slots = r.slots[: -len(r.spec.drafts)]
                r.spec.drafts = []
                self.spec.proposer.commit(r.spec, len(r.fill_ids), 0)

    def _release_draft(self, req: Req) -> None:
        """A request leaving the batch (finished or retracted) gives its draft KV back."""
        if req.spec is not None and self.spec is not None:
            self.spec.proposer.release(req.spec)

    def _retraction_order(self, reqs) -> list[Req]:
        """Memory shortage retracts from the end of this list: the newest requests, of the
        least urgent priority first under --enable-priority-scheduling."""
        by_priority = self.args.enable_priority_scheduling
        return sorted(reqs, key=lambda r: (r.priority if by_priority else 0, r.arrival))

    def _retract(self, req: Req) -> None:
        self.running.remove(req)
        self._release_draft(req)
        self.cache.cache_finished(req)
        self._release_lora(req)
        self.waiting.appendleft(req)
        self.stats.num_retractions += 1
        logger.debug("retracted %s after %d tokens", req.rid, len(req.output_ids))

    def _run(self, prefill: list[tuple[Req, int]], decode: list[Req]) -> None:
        ids: list[int] = []
        pos: list[int] = []
        loc: list[torch.Tensor] = []
        prefix_lens, extend_lens, req_slots = [], [], []
        lora_slots: list[int] = []
        sample_reqs: list[Req] = []
        logit_rows: list[int] = []
        prompt_rows: list[tuple[Req, int, int]] = []  # (request, row, the token it scores)
        no_sample: list[Req] = []  # prompt logprobs with max_tokens 0: prefill, then finish
        for req, n in prefill:
            total = req.slots.numel()
            start = total - n
            if req.prompt_lp_pending:
                first = max(req.prompt_lp_start, 1) - 1  # position whose logits score the next
                last = len(req.origin_input_ids) - 1  # the prompt's last token scores nothing
                for q in range(max(first, start), min(total, last)):
                    prompt_rows.append((req, len(ids) + q - start, req.origin_input_ids[q + 1]))
            ids += req.fill_ids[start:total]
            pos += range(start, total)
            loc.append(req.slots[start:])
            prefix_lens.append(start)
            extend_lens.append(n)
            req_slots.append(req.slots)
            lora_slots.append(-1 if req.lora_slot is None else req.lora_slot)
            if total == len(req.fill_ids):
                if req.params.max_new_tokens == 0:
                    no_sample.append(req)
                    continue
                sample_reqs.append(req)
                logit_rows.append(len(ids) - 1)
        # drafted requests verify their drafts as an extend: the last token, then the drafts
        drafted = [r for r in decode if r.spec is not None and r.spec.drafts]
        spec_rows: list[tuple[Req, int]] = []  # (request, its first row among the rows)
        for req in drafted:
            drafts = req.spec.drafts
            start = req.slots.numel() - len(drafts) - 1
            spec_rows.append((req, len(ids)))
            ids += [req.fill_ids[-1], *drafts]
            pos += range(start, start + len(drafts) + 1)
            loc.append(req.slots[start:])
            prefix_lens.append(start)
            extend_lens.append(len(drafts) + 1)
            req_slots.append(req.slots)
            lora_slots.append(-1 if req.lora_slot is None else req.lora_slot)
        for req in decode:
            if req.spec is not None and req.spec.drafts:
                continue
            total = req.slots.numel()
            ids.append(req.fill_ids[total - 1])
            pos.append(total - 1)
            loc.append(req.slots[total - 1 :])
            prefix_lens.append(total - 1)
            extend_lens.append(1)
            req_slots.append(req.slots)
            lora_slots.append(-1 if req.lora_slot is None else req.lora_slot)
            sample_reqs.append(req)
            logit_rows.append(len(ids) - 1)
        device = self.runner.device
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
            positions=torch.tensor(pos, dtype=torch.int64, device=device),
            out_cache_loc=torch.cat(loc).to(device),
            kv_pool=self.pool,
            num_prefill_reqs=len(prefill) + len(drafted),
            num_prefill_tokens=sum(n for _, n in prefill)
            + sum(len(r.spec.drafts) + 1 for r in drafted),
            prefix_lens=prefix_lens,
            extend_lens=extend_lens,
            req_slots=req_slots,
            lora_slots=lora_slots if self.lora is not None else None,
        )
        t0 = time.perf_counter()
        verify_rows = [row + i for req, row in spec_rows for i in range(len(req.spec.drafts) + 1)]
        rows = logit_rows + [row for _, row, _ in prompt_rows] + verify_rows
        try:
            logits = self.runner.forward(
                batch, torch.tensor(rows, dtype=torch.int64, device=device)
            )
        except (torch.OutOfMemoryError, MemoryError) as e:
            self._drop_drafts(drafted)
            self._shrink_after_oom(prefill, decode, e)
            return
        t1 = time.perf_counter()
        self.stats.time_forward_s += t1 - t0
        self.stats.forward_steps += 1
        self.stats.forward_tokens += len(ids)
        for req, _ in prefill:
            if req.slots.numel() == len(req.fill_ids):
                self.cache.cache_unfinished(req)
        if verify_rows:
            self._verify(logits[len(logits) - len(verify_rows) :], spec_rows)
        if prompt_rows:
            end = len(logit_rows) + len(prompt_rows)
            self._score_prompts(logits[len(logit_rows) : end], prompt_rows)
        logits = logits[: len(logit_rows)]
        for req in no_sample:
            self.running.remove(req)
            self._finish(req, FinishLength())
        if not sample_reqs:
            return
        next_ids, logprobs = sample(logits, [r.row for r in sample_reqs], self.shared_gen)
        t2 = time.perf_counter()
        self.stats.time_sample_s += t2 - t1
        for i, (req, tok) in enumerate(zip(sample_reqs, next_ids, strict=True)):
            req.output_ids.append(tok)
            self.stats.generation_tokens += 1
            if req.row.return_logprob and logprobs is not None:
                lp, alts = logprobs[i]
                req.logprobs.append((lp, alts[: req.row.top_logprobs_num]))
            reason = self._check_finished(req, tok)
            if reason is not None:
                self._finish(req, reason)
        self.stats.time_output_s += time.perf_counter() - t2

    def _verify(self, logits: torch.Tensor, spec_rows: list[tuple[Req, int]]) -> None:
        """Each drafted request keeps its accepted drafts and the target's next token (up to
        a stop), and gives back the slots of the drafts it rejected."""
        at = 0
        for req, _ in spec_rows:
            drafts, req.spec.drafts = req.spec.drafts, []
            n = len(drafts) + 1
            rows = logits[at : at + n]
            tokens, accepted, shaped = verify(rows, req.row, drafts, self.shared_gen)
            at += n
            self.spec.record(req.spec, len(drafts), accepted)
            self.stats.spec_draft_tokens += len(drafts)
            self.stats.spec_accepted_tokens += accepted
            self.stats.spec_rounds += 1
            base = len(req.fill_ids)  # the last token's position + 1: its KV is written now
            self.spec.proposer.commit(req.spec, base, accepted)
            reason = None
            emitted = 0
            for tok in tokens:
                req.output_ids.append(tok)
                emitted += 1
                self.stats.generation_tokens += 1
                reason = self._check_finished(req, tok)
                if reason is not None:
                    break
            if req.row.return_logprob:  # each emitted token's, from the row that chose it
                top_n = req.row.top_logprobs_num
                req.logprobs += token_logprobs(shaped[:emitted], tokens[:emitted], top_n)
            keep = base + min(emitted, accepted)  # positions whose KV holds accepted tokens
            self.pool.free(req.slots[keep:])
            req.slots = req.slots[:keep]
            if reason is not None:
                self._finish(req, reason)

    def _score_prompts(self, logits: torch.Tensor, rows: list[tuple[Req, int, int]]) -> None:
        """Prompt logprobs: each scored position's token under the logits before it."""
        top_n = max(req.row.top_logprobs_num for req, _, _ in rows)
        scored = token_logprobs(logits, [tok for _, _, tok in rows], top_n)
        for (req, _, _), (lp, alts) in zip(rows, scored, strict=True):
            req.prompt_logprobs.append((lp, alts[: req.row.top_logprobs_num]))

    def _shrink_after_oom(
        self, prefill: list[tuple[Req, int]], decode: list[Req], err: Exception
    ) -> None:
        """Out of activation memory: undo the step, halve the prefill budget, retract the
        newest half of the decoders, and let the next step run the smaller batch."""
        logger.warning("forward ran out of memory (%s); retrying with a smaller batch", err)
        self.stats.num_oom_retries += 1
        for req in decode:
            self.pool.free(req.slots[-1:])
            req.slots = req.slots[:-1]
        for req, n in prefill:
            self.pool.free(req.slots[-n:])
            req.slots = req.slots[:-n]
            if self.chunked is req:
                self.chunked = None
            if req.prompt_lp_pending:  # its prefill starts over: so do its prompt logprobs
                req.prompt_logprobs = [(None, [])] if req.prompt_lp_start == 0 else []
            self._retract(req)
        self.prefill_budget = max(self.prefill_budget // 2, 16)
        newest = self._retraction_order(decode)[len(decode) - len(decode) // 2 :]
        for req in newest if len(decode) > 1 else []:
            self._retract(req)

    def _update_stats(self) -> None:
        s = self.stats
        s.num_running = len(self.running)
        s.num_waiting = len(self.waiting)
        s.kv_used_tokens = self.pool.size - self._available()
        if self.lora is not None:
            s.max_loras = self.lora.max_loras
            s.running_lora_adapters = sorted({r.lora_name for r in self.running} - {None})
            waiting = [r.lora_name for r in self.waiting] + [
                r.lora_name for r, _ in self.grammar_wait
            ]
            s.waiting_lora_adapters = sorted(set(waiting) - {None})

    # ---- LoRA adapters: load, unload, pins -----------------------------------------------
    def lora_request(self, msg: LoadLoraReq | UnloadLoraReq) -> None:
        """Load at once; unload once no accepted request uses the adapter any more (its
        waiting and running requests finish first, none is lost)."""
        if self.lora is None:
            self._lora_reply(msg, False, "LoRA is off: start the server with --enable-lora", 400)
        elif isinstance(msg, LoadLoraReq):
            try:
                text = self.lora.load(msg.lora_name, msg.source, msg.folder)
            except LoraError as e:
                self._lora_reply(msg, False, str(e), e.status)
            else:
                self._lora_reply(msg, True, text)
        elif not self.lora.usable(msg.lora_name):
            self._lora_reply(msg, False, f"LoRA adapter {msg.lora_name!r} is not loaded", 404)
        else:
            self.pending_unloads.append(msg)
            self._finish_unloads()

    def _finish_unloads(self) -> None:
        still = []
        for msg in self.pending_unloads:
            if self.lora.try_unload(msg.lora_name):
                self._lora_reply(msg, True, f"adapter {msg.lora_name!r} unloaded")
            else:
                still.append(msg)
        self.pending_unloads = still

    def _lora_reply(self, msg, success: bool, message: str, status: int = 200) -> None:
        adapters = self.lora.loaded() if self.lora is not None else {}
        self.finished_outputs.append(LoraReply(msg.rid, success, message, status, adapters))

    def _release_lora(self, req: Req) -> None:
        if req.lora_slot is not None:
            self.lora.release(req.lora_name)
            req.lora_slot = None

    # ---- finish: the stop rule and the outputs -------------------------------------------
    def _check_finished(self, req: Req, tok: int) -> FinishReason | None:
        """Why the request ends with `tok`, just appended, if it does; a grammar is fed the
        token here (every emitted token passes once, plain or speculated) and ends it when
        it terminates."""
        reason = self._stop_reason(req, tok)
        grammar = req.row.grammar
        if grammar is not None and reason is None:
            grammar.accept_token(tok)
            if grammar.is_terminated():
                reason = FinishStop(tok)
        return reason

    def _stop_reason(self, req: Req, tok: int) -> FinishReason | None:
        p = req.params
        n_out = len(req.output_ids)
        if n_out >= p.min_new_tokens:
            if tok in req.row.stop_ids:
                return FinishStop(tok)
            if p.stop:
                matched = self._match_stop_string(req)
                if matched is not None:
                    return FinishStop(matched)
        if n_out >= p.max_new_tokens or len(req.fill_ids) >= self.runner.context_length:
            return FinishLength()
        return None

    def _match_stop_string(self, req: Req) -> str | None:
        """Decode only the tail that could hold a stop string that just completed."""
        longest = max(len(s) for s in req.params.stop)
        tail = self.tokenizer.decode(
            req.output_ids[-(longest + 2) :], skip_special_tokens=req.params.skip_special_tokens
        )
        for s in req.params.stop:
            if s in tail:
                return s
        return None

    def _finish(self, req: Req, reason: FinishReason) -> None:
        req.finished_reason = reason
        self._release_draft(req)
        if req.slots.numel():
            self.cache.cache_finished(req)
        if req.lora_name is not None:
            self._release_lora(req)
            self.lora.users[req.lora_name] -= 1
        self.finished_outputs.append(self._output(req))

    def _output(self, req: Req) -> ReqOutput:
        new = req.output_ids[req.sent_len :]
        lps = req.logprobs[req.sent_len :] if req.row.return_logprob else None
        req.sent_len = len(req.output_ids)
        queue_time = None
        if req.queue_time is not None and not req.queue_time_sent:
            queue_time, req.queue_time_sent = req.queue_time, True
        prompt_lps = None
        if req.prompt_lp_start >= 0 and not req.prompt_lp_pending and not req.prompt_lp_sent:
            prompt_lps, req.prompt_lp_sent = req.prompt_logprobs, True
        return ReqOutput(
            rid=req.rid,
            new_token_ids=new,
            prompt_tokens=len(req.origin_input_ids),
            cached_tokens=req.cached_tokens,
            completion_tokens=len(req.output_ids),
            finish_reason=req.finished_reason,
            logprobs=lps,
            queue_time=queue_time,
            prompt_logprobs=prompt_lps,
        )
