"""Multi-LoRA on the projections: many adapters and the base model in one forward (S-LoRA,
Punica), in as few torch calls per projection as the step allows.

Weights. Each LoRA-capable projection keeps `max_loras` weight slots. A is stacked as
[slots, rank, parts, in]: `parts` are the checkpoint projections fused into ours (q, k, v
in qkv_proj; gate, up in gate_up_proj), each with its own A, so one matmul shrinks all
parts at once. The scaled B^T is stacked as [slots, chunks, rank, chunk]: the fused output
cut in chunks of the parts' greatest common size (q, k, v of 576, 192, 192: five chunks of
192), each chunk multiplied by its own part's columns of the shrink in one batched matmul.
(The earlier block-diagonal B, [rank * parts, out] with zeros off each part's columns,
multiplied and read those zeros: 3x the expand's work on qkv, 2x on gate_up.) An adapter
of rank r fills rank rows [0, r) of its slot and leaves the rest zero, so a step computes
only up to the largest rank among its adapters, and the slicing is a view.

A step is planned once (`LoraBatch`, one per forward) and every projection reuses the plan:
- long segments (prefill chunks) take the shrink and the expand on their contiguous rows,
  the expand adding into the base output in place (`addmm_`/`baddbmm_`): S-LoRA's
  segmented GEMM as a loop over slices, neighbouring segments of one adapter merged;
- the short rows at the end of the step (decoding requests, speculative verification)
  take one of two forms:
  - single: they all use one adapter: the same calls as a segment, on all of them, with
    no gather or padding;
  - grouped: several adapters: the rows are gathered by slot into one padded
    [slots, widest, in] block, one `torch.bmm` shrinks every adapter's rows at once
    (Punica's BGMV, in torch's batched GEMM), one more expands them into a buffer made
    once per step, and one gather brings the deltas back in row order for one in-place
    add.
Why: at decode sizes each matmul is tiny and the CPU's cost per torch call dominates, and
at prefill sizes the bfloat16 matmuls with few columns run far below the base matmul's
rate: the earlier form (a fresh zero row concatenated to each decode delta, prefill deltas
built, cast, then added) cost more than the base matmul on a prefill of 4 x 256 rows.
Scatters are avoided on purpose: torch's CPU `index_add_` on bfloat16 rows took 45% of a
16-adapter decode step's CPU time in torch's profiler. A "stacked" form (every row against
every resident adapter in one matmul, masked to its own row's) was measured and dropped:
three calls, but its matmuls grow with the number of adapters and cost as much as the
base matmul at 16 (bench/lora_delta.py times the forms per step shape). Measured again
with one expand per part (no zero blocks) and the weights in mkldnn's packed bfloat16
layout (a plain bfloat16 matmul reorders its weight on every call): 18% below the
grouped form on one layer's weights (hot in cache), 14% on 30 layers' (cold), and no
gain in a whole 32-row decode step (131 against 129 ms, one thread): both forms are
bound by reading the adapters' weights there. Dropped; it would also keep a packed copy
of every adapter.
Rows of the base model (slot -1) take no LoRA work: outside the segments, or reading a
zero row of the buffer.

On the CPU in bfloat16, where the kernels build with AVX512_BF16, none of the torch forms
above runs: every projection's delta for all the step's rows is one C call
(`cpu_kernels.lora_delta`, rows grouped by adapter, `vdpbf16ps` arithmetic), and decode
steps of the int4 path add it inside their one-call step (layers/cpu_decode.py). CUDA
graphs capture a third, fixed-shape form (`LoraRows`).

Threads: the delta runs on the step's threads. One thread for it (a toggle around each
call) was measured and not kept: with other processes loading the 2-core VM it served
16 adapters at 0.70-0.72x instead of 0.63-0.65x (the joins of its ~1,000 small parallel
regions a step wait for a thread that lost its core), but on the quiet machine, the
goal's condition, ~4% fewer tokens a second at 16 adapters (three pairs; the results
README's "Multi-LoRA"). In a whole decode step the delta is mostly reading the adapters'
weights: 16 adapters of rank 16 on all seven projections are 156 MB a step in bfloat16,
read at ~4-6 GB/s a core on that VM, and with the second core free two threads read it
faster (in process: 0.66x the base step against 0.62x on one thread).
"""

from __future__ import annotations

import ctypes
import functools
import math

import torch

from radixserve.layers import cpu_kernels

SHORT_SEGMENT = 8  # a request of at most this many rows at the step's end joins the batched forms


class LoraBatch:
    """One step's rows by adapter slot; built once per forward, read by every projection."""

    def __init__(
        self, req_slots: list[int], extend_lens: list[int], ranks: dict[int, int], device
    ) -> None:
        starts, start = [], 0
        for n in extend_lens:
            starts.append(start)
            start += n
        # the short rows: the trailing requests of at most SHORT_SEGMENT rows each (the
        # scheduler puts prefill chunks first, then drafted requests, then decoding ones)
        first = len(req_slots)
        while first > 0 and extend_lens[first - 1] <= SHORT_SEGMENT:
            first -= 1
        self.start = starts[first] if first < len(req_slots) else start
        self.ranks = ranks  # slot -> rank of its adapter (the one-call decode step reads it)
        self._req = (req_slots, extend_lens)
        self._kernel_rows: tuple[ctypes.Array, ctypes.Array] | None = None
        # (start, end, slot, rank) of the front's segments under an adapter, neighbours merged
        self.segments: list[tuple[int, int, int, int]] = []
        for i in range(first):
            slot, s, e = req_slots[i], starts[i], starts[i] + extend_lens[i]
            if slot < 0:
                continue
            if self.segments and self.segments[-1][1] == s and self.segments[-1][2] == slot:
                s = self.segments.pop()[0]
            self.segments.append((s, e, slot, ranks[slot]))
        tail = [(slot, extend_lens[i]) for i, slot in enumerate(req_slots[first:], first)]
        used = sorted({slot for slot, _ in tail if slot >= 0})
        self.mode = "none"
        if not used:
            return
        self.rank = max(ranks[s] for s in used)
        if len(used) == 1 and all(slot >= 0 for slot, _ in tail):
            self.mode, self.slot = "single", used[0]
            return
        self.mode = "grouped"
        self.lo = used[0]
        self.num_slots = used[-1] - used[0] + 1  # the bmm covers slots [lo, lo + num_slots)
        self._tail, self._device = tail, device
        self.buffers: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}
        self.chunk_index: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    @functools.cached_property
    def _index(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The grouped form's row layout (widest, gather, back), made on its first use: a
        step whose deltas all run in the C kernels never needs it."""
        per_row = torch.tensor(
            [slot for slot, n in self._tail for _ in range(n)], dtype=torch.int64
        )
        rows = (per_row >= 0).nonzero().flatten()
        slots = per_row[rows] - self.lo
        order = torch.argsort(slots, stable=True)
        rows, slots = rows[order], slots[order]
        counts = torch.bincount(slots, minlength=self.num_slots)
        widest = int(counts.max())
        # place i of slot s's rows is s * widest + i; the other places repeat row 0 and are
        # computed but never read back
        place = slots * widest + torch.arange(rows.numel()) - (counts.cumsum(0) - counts)[slots]
        gather = torch.zeros(self.num_slots * widest, dtype=torch.int64)
        gather[place] = rows
        # per short row: where its delta lies in the buffer, or the zero row past the places
        back = torch.full((per_row.numel(),), self.num_slots * widest, dtype=torch.int64)
        back[rows] = place
        return widest, gather.to(self._device), back.to(self._device)

    @property
    def widest(self) -> int:
        return self._index[0]

    @property
    def gather(self) -> torch.Tensor:
        return self._index[1]

    @property
    def back(self) -> torch.Tensor:
        return self._index[2]

    def kernel_rows(self) -> tuple[ctypes.Array, ctypes.Array]:
        """Every row's adapter slot (-1: base) and its rank, as the C delta reads them; made
        once per step."""
        if self._kernel_rows is None:
            req_slots, extend_lens = self._req
            slots = [s for s, n in zip(req_slots, extend_lens, strict=True) for _ in range(n)]
            self._kernel_rows = (
                (ctypes.c_int * len(slots))(*slots),
                (ctypes.c_int * len(slots))(*[self.ranks[s] if s >= 0 else 0 for s in slots]),
            )
        return self._kernel_rows

    @staticmethod
    def build(
        req_slots: list[int], extend_lens: list[int], ranks: dict[int, int], device
    ) -> LoraBatch | None:
        """The plan for a step whose requests use `req_slots` (-1: base) over `extend_lens`
        rows each; None when no request of the step uses an adapter."""
        if all(s < 0 for s in req_slots):
            return None
        return LoraBatch(req_slots, extend_lens, ranks, device)

    def buffer(self, rows: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """The grouped form's [rows + 1, width] output, its last row zero; one per shape and
        step, shared by the projections of that shape (each reads it back before the next
        projection writes it)."""
        key = (rows, width, like.dtype)
        buf = self.buffers.get(key)
        if buf is None:
            buf = like.new_empty(rows + 1, width)
            buf[-1].zero_()
            self.buffers[key] = buf
        return buf

    def chunks(self, chunk_part: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """For a fused projection whose output is cut in chunks (part `chunk_part[c]` owns
        chunk c): where each (slot, chunk, place, rank) entry of the expand's input lies in
        the shrink's [slots, widest, rank, parts] output, and per (short row, chunk) where
        its delta lies among the [slots, chunks, widest] expand rows (or the zero row)."""
        if chunk_part not in self.chunk_index:
            s, w, r, c = self.num_slots, self.widest, self.rank, len(chunk_part)
            parts = max(chunk_part) + 1
            idx = torch.arange(s * w * r * parts).view(s, w, r, parts)
            idx = idx[..., list(chunk_part)].permute(0, 3, 1, 2).flatten()  # [s, c, w, r]
            places = s * w
            slot, pos = self.back // w, self.back % w
            back = (slot[:, None] * c + torch.arange(c, device=slot.device)) * w + pos[:, None]
            back = torch.where(self.back[:, None] < places, back, s * c * w).flatten()
            self.chunk_index[chunk_part] = (idx.to(self.back.device), back)
        return self.chunk_index[chunk_part]


class LoraRows:
    """A decode step's adapters as per-row tensors of fixed shape, for steps captured in a
    CUDA graph: each row gathers its own slot's A and B^T (base rows any slot, their delta
    multiplied by a zero mask), every shape set by the batch size and the slots' rank, so a
    graph captured once replays any mix of adapters by refilling `slot` and `mask` in place.
    On a GPU the gathered weights cost little next to the eager forms' few hundred launches
    a step; on the CPU the step plans (LoraBatch) stay."""

    def __init__(self, slot: torch.Tensor, mask: torch.Tensor) -> None:
        self.slot = slot  # [rows] int64: the row's slot (0 for a base row)
        self.mask = mask  # [rows] in the activations' dtype: 1 for an adapter's row, else 0

    def fill(self, lora_slots: list[int] | None) -> None:
        """This step's slots into the fixed buffers (rows past the batch: masked out)."""
        n = len(lora_slots or ())
        self.slot.zero_()
        self.mask.zero_()
        if n:
            slots = torch.tensor(lora_slots, dtype=torch.int64)
            self.slot[:n].copy_(slots.clamp(min=0), non_blocking=True)
            self.mask[:n].copy_((slots >= 0).to(self.mask.dtype), non_blocking=True)


class LoraSlots:
    """The stacked adapter weights of one projection (see the module docstring)."""

    def __init__(
        self, num_slots: int, max_rank: int, in_features: int, part_sizes: list[int], dtype, device
    ) -> None:
        out = sum(part_sizes)
        parts = len(part_sizes)
        self.a = torch.zeros(num_slots, max_rank, parts, in_features, dtype=dtype, device=device)
        self.chunk = math.gcd(*part_sizes)
        self.chunk_part = tuple(p for p, n in enumerate(part_sizes) for _ in range(n // self.chunk))
        self.part_chunks = torch.tensor(self.chunk_part, device=device)
        self.bc = torch.zeros(
            num_slots, len(self.chunk_part), max_rank, self.chunk, dtype=dtype, device=device
        )
        self.out_features = out
        self.kernel_shape: cpu_kernels.LoraShape | None = None
        chunks = len(self.chunk_part)
        if (
            dtype == torch.bfloat16 and torch.device(device).type == "cpu"
            and cpu_kernels.lora_delta_available() and in_features % 32 == 0
            and self.chunk % 8 == 0 and max_rank <= cpu_kernels.LORA_MAX_RANK
            and parts <= cpu_kernels.LORA_MAX_PARTS and chunks <= cpu_kernels.LORA_MAX_CHUNKS
        ):  # fmt: skip
            shape = cpu_kernels.LoraShape(parts, in_features, out, self.chunk, chunks)
            shape.chunk_part[:chunks] = self.chunk_part
            self.kernel_shape = shape

    def write(self, slot: int, part: int, a: torch.Tensor, b_scaled: torch.Tensor) -> None:
        """Put one part's A [r, in] and scaling * B [out_part, r] in `slot`."""
        r = a.shape[0]
        self.a[slot, :r, part] = a
        first = self.chunk_part.index(part)
        n = b_scaled.shape[0] // self.chunk
        self.bc[slot, first : first + n, :r] = b_scaled.t().view(r, n, self.chunk).transpose(0, 1)

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        self.bc[slot].zero_()

    def _segment(self, out: torch.Tensor, x: torch.Tensor, slot: int, rank: int) -> None:
        """out += x A^T B^T for rows of one adapter: the shrink, then one addmm_ (one part)
        or, for fused parts, each output chunk from its own part's columns of the shrink
        in one batched matmul that adds in place (no zero blocks multiplied)."""
        s = x @ self.a[slot, :rank].flatten(0, 1).t()  # [rows, rank*parts], columns (r, p)
        bc = self.bc[slot, :, :rank]  # [chunks, rank, chunk]
        if bc.shape[0] == 1:
            out.addmm_(s, bc[0])
            return
        n = s.shape[0]
        sc = s.view(n, rank, -1).index_select(2, self.part_chunks).permute(2, 0, 1)
        out.view(n, -1, self.chunk).transpose(0, 1).baddbmm_(sc, bc)

    def _rows_delta(self, out: torch.Tensor, x: torch.Tensor, lb: LoraRows) -> torch.Tensor:
        """The fixed-shape form (LoraRows): per row its slot's A [rank * parts, in] and B^T
        chunks, one batched matmul each, masked, added in place."""
        n, rank = x.shape[0], self.a.shape[1]
        a = self.a.index_select(0, lb.slot).flatten(1, 2)  # [n, rank*parts, in]
        s = torch.bmm(x.unsqueeze(1), a.transpose(1, 2))  # [n, 1, rank*parts], columns (r, p)
        sc = s.view(n, rank, -1).index_select(2, self.part_chunks).permute(0, 2, 1)
        bc = self.bc.index_select(0, lb.slot)  # [n, chunks, rank, chunk]
        delta = torch.matmul(sc.unsqueeze(2), bc).view(n, -1)
        return out.add_(delta * lb.mask[:, None])

    def add_delta(self, out: torch.Tensor, x: torch.Tensor, lb: LoraBatch) -> torch.Tensor:
        """out += x @ A^T @ B^T per row, with each row's adapter; in place. In bfloat16 on a
        CPU with AVX512_BF16 the whole step's rows go to one C call (cpu_kernels.lora_delta:
        segments and decode rows alike, ~1 call instead of ~10 small matmuls a projection)."""
        if isinstance(lb, LoraRows):
            return self._rows_delta(out, x, lb)
        if (
            self.kernel_shape is not None and x.dtype == torch.bfloat16
            and out.dtype == torch.bfloat16 and x.is_contiguous() and out.is_contiguous()
        ):  # fmt: skip
            slots, ranks = lb.kernel_rows()
            if len(slots) == x.shape[0] and cpu_kernels.lora_delta(
                out, x, self.a, self.bc, self.kernel_shape, slots, ranks
            ):
                return out
        for start, end, slot, rank in lb.segments:
            self._segment(out[start:end], x[start:end], slot, rank)
        if lb.mode == "none":
            return out
        xs, outs = x[lb.start :], out[lb.start :]
        if lb.mode == "single":
            self._segment(outs, xs, lb.slot, lb.rank)
            return out
        slots = slice(lb.lo, lb.lo + lb.num_slots)
        a = self.a[slots, : lb.rank].flatten(1, 2)  # [slots, rank*parts, in]
        xg = xs.index_select(0, lb.gather).view(lb.num_slots, lb.widest, -1)
        s = torch.bmm(xg, a.transpose(1, 2))  # [slots, widest, rank*parts]
        c = len(self.chunk_part)
        bc = self.bc[slots, :, : lb.rank].flatten(0, 1)  # [slots*chunks, rank, chunk]
        buf = lb.buffer(lb.num_slots * c * lb.widest, self.chunk, out)
        places = buf[:-1].view(lb.num_slots * c, lb.widest, self.chunk)
        if c == 1:  # one part, one chunk: the shrink's output is the expand's input
            torch.bmm(s, bc, out=places)
            outs += buf.index_select(0, lb.back)
            return out
        # each chunk takes its own part's columns of the shrink's output
        idx, back = lb.chunks(self.chunk_part)
        sc = s.view(-1).index_select(0, idx).view(lb.num_slots * c, lb.widest, lb.rank)
        torch.bmm(sc, bc, out=places)
        outs.view(-1, self.chunk).add_(buf.index_select(0, back))
        return out
