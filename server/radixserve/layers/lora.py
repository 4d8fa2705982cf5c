"""Multi-LoRA on the projections: many adapters and the base model in one forward (S-LoRA,
Punica).

Each LoRA-capable projection keeps `max_loras` weight slots, stacked: A as [slots, rank, parts,
in] and B (scaled, transposed) as [slots, rank, parts, out]. `parts` are the checkpoint
projections fused into ours (q, k, v in qkv_proj; gate, up in gate_up_proj): each part has
its own A, and its B only reaches its own output columns (B is block-diagonal over the
parts, zero elsewhere), so one pair of matmuls covers the fused projection. An adapter of
rank r fills rank rows [0, r) of its slot and leaves the rest zero, so a step computes only
up to the largest rank among its adapters (`LoraBatch.rank`), and the slicing is a view.

A step's rows are planned once (`LoraBatch`) and every projection reuses the plan:
- single-row segments (decoding requests) are gathered by slot into one padded
  [slots, rows, in] block, and two `torch.bmm` calls compute every adapter's delta at once
  (Punica's BGMV, in torch's batched GEMM), reading the slots' weights in place; the deltas
  come back in token order through one gather (`index_select`) from the padded result;
- longer segments (prefill chunks) take one pair of matmuls each, on their contiguous rows
  (S-LoRA's segmented GEMM as a loop over slices): no padding, no indexing.
Why: at decode sizes each matmul is tiny and the per-call cost of an op on the CPU
dominates, so two bmm calls per projection beat two calls per adapter (16 adapters x 4
projections x 30 layers is ~4,000 calls a step); a prefill segment's matmuls are large
enough that a call each costs nothing extra. Scatters are avoided on purpose: torch's CPU
`index_add_` on bfloat16 rows took 45% of a 16-adapter decode step's CPU time in torch's
profiler (bench/lora_delta.py times the delta per step shape).
Rows of the base model (slot -1) take no LoRA work at all.
"""

from __future__ import annotations

import torch


class LoraBatch:
    """One step's rows by adapter slot; built once, read by every projection."""

    def __init__(self, token_slots: torch.Tensor, segments: list[tuple[int, int, int]], rank: int):
        self.rank = rank  # largest rank among this step's adapters
        self.num_tokens = token_slots.numel()
        # (start, end, slot) of every multi-row segment under an adapter, for the loop
        self.segments = [seg for seg in segments if seg[1] - seg[0] > 1]
        single = torch.tensor(
            [start for start, end, _ in segments if end - start == 1], dtype=torch.int64
        )
        self.num_slots = 0
        if single.numel():
            single = single.to(token_slots.device)
            slots = token_slots[single]
            order = torch.argsort(slots, stable=True)
            rows, slots = single[order], slots[order]
            used, counts = torch.unique_consecutive(slots, return_counts=True)
            self.num_slots = int(used.max()) + 1  # the bmm covers slots [0, num_slots)
            self.widest = int(counts.max())
            # place i of slot s's rows is s * widest + i; the other places repeat row 0 and
            # are computed but never read back
            group = torch.repeat_interleave(torch.arange(used.numel(), device=rows.device), counts)
            place = (
                slots * self.widest
                + torch.arange(rows.numel(), device=rows.device)
                - (torch.cumsum(counts, 0) - counts)[group]
            )
            self.gather = torch.zeros(
                self.num_slots * self.widest, dtype=torch.int64, device=rows.device
            )
            self.gather[place] = rows
            # per token: where its delta lies in the padded result, or the zero row past it
            self.back = torch.full(
                (self.num_tokens,), self.num_slots * self.widest, device=rows.device
            )
            self.back[rows] = place

    @staticmethod
    def build(
        req_slots: list[int], extend_lens: list[int], ranks: dict[int, int], device
    ) -> LoraBatch | None:
        """The plan for a step whose requests use `req_slots` (-1: base) over `extend_lens`
        rows each; None when no request of the step uses an adapter."""
        used = {s for s in req_slots if s >= 0}
        if not used:
            return None
        segments, start = [], 0
        for slot, n in zip(req_slots, extend_lens, strict=True):
            if slot >= 0:
                segments.append((start, start + n, slot))
            start += n
        per_token = torch.repeat_interleave(
            torch.tensor(req_slots, dtype=torch.int64), torch.tensor(extend_lens)
        )
        return LoraBatch(per_token.to(device), segments, max(ranks[s] for s in used))


class LoraSlots:
    """The stacked adapter weights of one projection (see the module docstring)."""

    def __init__(
        self, num_slots: int, max_rank: int, in_features: int, part_sizes: list[int], dtype, device
    ) -> None:
        out = sum(part_sizes)
        parts = len(part_sizes)
        self.a = torch.zeros(num_slots, max_rank, parts, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(num_slots, max_rank, parts, out, dtype=dtype, device=device)
        offsets = [sum(part_sizes[:i]) for i in range(parts)]
        self.part_columns = [range(o, o + n) for o, n in zip(offsets, part_sizes, strict=True)]

    def write(self, slot: int, part: int, a: torch.Tensor, b_scaled: torch.Tensor) -> None:
        """Put one part's A [r, in] and scaling * B [out_part, r] in `slot`."""
        r = a.shape[0]
        cols = self.part_columns[part]
        self.a[slot, :r, part] = a
        self.b[slot, :r, part, cols.start : cols.stop] = b_scaled.t()

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()

    def add_delta(self, out: torch.Tensor, x: torch.Tensor, lb: LoraBatch) -> torch.Tensor:
        """out += x @ A^T @ B^T per row, with each row's adapter; in place."""
        for start, end, slot in lb.segments:
            a = self.a[slot, : lb.rank].flatten(0, 1)  # [rank*parts, in], a view
            b = self.b[slot, : lb.rank].flatten(0, 1)  # [rank*parts, out]
            out[start:end] += ((x[start:end] @ a.t()) @ b).to(out.dtype)
        if lb.num_slots:
            a = self.a[: lb.num_slots, : lb.rank].flatten(1, 2)  # [slots, rank*parts, in]
            b = self.b[: lb.num_slots, : lb.rank].flatten(1, 2)  # [slots, rank*parts, out]
            xs = x.index_select(0, lb.gather).view(lb.num_slots, lb.widest, -1)
            delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b).flatten(0, 1)
            delta = torch.cat([delta, delta.new_zeros(1, delta.shape[1])])
            out += delta.index_select(0, lb.back).to(out.dtype)
        return out
