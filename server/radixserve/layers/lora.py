"""Multi-LoRA on the projections: many adapters and the base model in one forward (S-LoRA,
Punica).

Each LoRA-capable projection keeps `max_loras` weight slots, stacked: A as [slots, rank, parts,
in] and B (scaled, transposed) as [slots, rank, parts, out]. `parts` are the checkpoint
projections fused into ours (q, k, v in qkv_proj; gate, up in gate_up_proj): each part has
its own A, and its B only reaches its own output columns (B is block-diagonal over the
parts, zero elsewhere), so one pair of matmuls covers the fused projection. An adapter of
rank r fills rank rows [0, r) of its slot and leaves the rest zero, so a step computes only
up to the largest rank among its adapters (`LoraBatch.rank`), and the slicing is a view.

A step's rows are grouped once by slot (`LoraBatch`) and every projection reuses that plan:
- decode-heavy steps (few rows per adapter): the rows are gathered into one padded
  [slots, rows, in] block and two `torch.bmm` calls compute every adapter's delta at once
  (Punica's BGMV, in torch's batched GEMM), reading the slots' weights in place;
- prefill-heavy steps (long segments, where padding would waste most of the work): one pair
  of matmuls per adapter group (S-LoRA's segmented GEMM as a loop).
The choice is per step (`PAD_WASTE`). Why: at decode sizes each matmul is tiny and the
per-call cost of an op on the CPU dominates, so two bmm calls per projection beat two calls
per adapter (16 adapters x 4 projections x 30 layers is ~4,000 calls a step); with long
segments the padding to the longest group would multiply the work instead, and the loop's
few calls cost nothing beside its matmuls. bench/lora_delta.py times both.
Rows of the base model (slot -1) take no LoRA work at all.
"""

from __future__ import annotations

import torch

# the padded bmm is used while its padded rows are at most this many times the real ones
PAD_WASTE = 2.0


class LoraBatch:
    """One step's rows grouped by adapter slot; built once, read by every projection."""

    def __init__(self, token_slots: torch.Tensor, rank: int) -> None:
        self.rank = rank  # largest rank among this step's adapters
        rows = torch.nonzero(token_slots >= 0).squeeze(1)
        slots = token_slots[rows]
        order = torch.argsort(slots, stable=True)
        rows, slots = rows[order], slots[order]
        used, counts = torch.unique_consecutive(slots, return_counts=True)
        self.num_slots = int(used.max()) + 1  # the bmm covers slots [0, num_slots)
        widest = int(counts.max())
        self.padded = self.num_slots * widest <= PAD_WASTE * rows.numel()
        # per group: (slot, its rows), for the segmented loop
        self.groups = list(zip(used.tolist(), rows.split(counts.tolist()), strict=True))
        if self.padded:
            # place i of slot s's rows at s * widest + i; the remaining places repeat row 0
            # and are computed but never added back
            starts = torch.cumsum(counts, 0) - counts
            place = slots * widest + (
                torch.arange(rows.numel(), device=rows.device)
                - starts[
                    torch.repeat_interleave(torch.arange(used.numel(), device=rows.device), counts)
                ]
            )
            self.gather = torch.zeros(
                self.num_slots * widest, dtype=torch.int64, device=rows.device
            )
            self.gather[place] = rows
            self.place, self.rows, self.widest = place, rows, widest

    @staticmethod
    def build(
        req_slots: list[int], extend_lens: list[int], ranks: dict[int, int], device
    ) -> LoraBatch | None:
        """The plan for a step whose requests use `req_slots` (-1: base) over `extend_lens`
        rows each; None when no request of the step uses an adapter."""
        used = {s for s in req_slots if s >= 0}
        if not used:
            return None
        per_token = torch.repeat_interleave(
            torch.tensor(req_slots, dtype=torch.int64), torch.tensor(extend_lens)
        )
        return LoraBatch(per_token.to(device), max(ranks[s] for s in used))


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
        a = self.a[: lb.num_slots, : lb.rank].flatten(1, 2)  # [slots, rank*parts, in], a view
        b = self.b[: lb.num_slots, : lb.rank].flatten(1, 2)  # [slots, rank*parts, out]
        if lb.padded:
            xs = x[lb.gather].view(lb.num_slots, lb.widest, -1)
            delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b).flatten(0, 1)[lb.place]
            return out.index_add_(0, lb.rows, delta.to(out.dtype))
        for slot, rows in lb.groups:
            delta = (x[rows] @ a[slot].t()) @ b[slot]
            out.index_add_(0, rows, delta.to(out.dtype))
        return out
