"""A mixture-of-experts MLP: routing, then grouped expert matmuls.

Routing (per family, in float32 as the references do):
- `softmax_topk`: softmax over every expert, keep the top k, optionally renormalise them to
  sum to 1 (Mixtral always, Qwen3-MoE when `norm_topk_prob`).
- `topk_softmax`: keep the top k logits, softmax over those only (gpt-oss).

The experts run grouped: the step's (token, expert) pairs are sorted by expert, and each
expert that received any token runs once over all of its tokens (two matmuls), never token
by token. The weighted outputs are summed back per token with one index_add.

Two ways to run the sorted rows through the experts:
- `_experts_looped` (the CPU, and any case below): one F.linear pair per expert that got
  rows, which reads the per-expert counts on the host.
- `_experts_grouped` (CUDA, bfloat16, compute capability 8.0+, rows 16-byte aligned):
  torch's own grouped GEMM, `torch.nn.functional.grouped_mm` (in the torch wheel,
  maintained in PyTorch, no build of ours; a torch without it runs the loop): two
  launches per layer whatever the number of experts, offsets kept on the device. Checked against the looped
  path on the CPU (grouped_mm's CPU fallback, tests/server/test_moe_layer.py); on a GPU
  by bench/gpu/moe_grouped.py, NOT yet run on hardware.

Under tensor parallelism each expert's intermediate dimension is split (as a dense MLP's
is): every rank holds all experts with its columns of gate/up and the matching input
columns of down, the router is replicated, and one all-reduce per layer joins the partial
sums. The down projection's bias (gpt-oss) is added on rank 0 only, so it counts once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.layers.parallel import all_reduce, split_range, tp_rank, tp_size


def softmax_topk(
    logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k])."""
    probs = logits.float().softmax(-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def topk_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, ids = logits.topk(top_k, dim=-1)
    return values.float().softmax(-1), ids


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class FusedMoE(nn.Module):
    """All experts of one layer: w13 [E, 2 * I_local, H] (gate rows, then up rows), w2
    [E, H, I_local]; `activation` maps a [n, 2 * I_local] gate/up output to [n, I_local]."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        bias: bool = False,
        activation: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul,
    ) -> None:
        super().__init__()
        start, end = split_range(intermediate_size, tp_size(), tp_rank())
        self.columns = range(start, end)  # this rank's intermediate columns of every expert
        inter = end - start
        self.num_experts = num_experts
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, inter))
        self.b13 = nn.Parameter(torch.empty(num_experts, 2 * inter)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, hidden_size)) if bias else None
        self.activation = activation

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H]; weights and ids [T, k] from a router. Returns [T, H] in x's dtype."""
        top_k = ids.shape[1]
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
        tokens = order // top_k
        run = self._experts_grouped if self._grouped_mm_fits(x) else self._experts_looped
        y = run(x[tokens], flat[order])
        y = y * weights.reshape(-1)[order, None].to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, tokens, y)
        return all_reduce(out)

    def _grouped_mm_fits(self, x: torch.Tensor) -> bool:
        """What torch's grouped GEMM takes on CUDA: bfloat16 on compute capability 8.0+,
        rows of both weights a multiple of 16 bytes."""
        if not (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(F, "grouped_mm")):
            return False
        aligned = all(n % 8 == 0 for n in (*self.w13.shape[1:], self.w2.shape[2]))
        return aligned and torch.cuda.get_device_capability(x.device) >= (8, 0)

    def _down_bias(self) -> torch.Tensor | None:
        """gpt-oss's down bias, on rank 0 only: the all-reduce then counts it once."""
        return self.b2 if self.b2 is not None and tp_rank() == 0 else None

    def _experts_looped(self, rows: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """rows [N, H] sorted by their expert ids `experts` [N] -> [N, H]: two matmuls
        per expert that got rows."""
        counts = torch.bincount(experts, minlength=self.num_experts).tolist()
        outs = []
        start = 0
        down_bias = self._down_bias()
        for e, n in enumerate(counts):
            if n == 0:
                continue
            h = F.linear(
                rows[start : start + n], self.w13[e], None if self.b13 is None else self.b13[e]
            )
            outs.append(
                F.linear(
                    self.activation(h), self.w2[e], None if down_bias is None else down_bias[e]
                )
            )
            start += n
        return torch.cat(outs)

    def _experts_grouped(self, rows: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """As `_experts_looped`, in two grouped GEMMs; offsets stay on the device."""
        counts = torch.bincount(experts, minlength=self.num_experts)
        offs = counts.cumsum(0).to(torch.int32)
        h = F.grouped_mm(rows, self.w13.mT, offs=offs)
        if self.b13 is not None:
            h = h + self.b13[experts]
        y = F.grouped_mm(self.activation(h), self.w2.mT, offs=offs)
        down_bias = self._down_bias()
        return y if down_bias is None else y + down_bias[experts]

    def load_expert(self, name: str, expert: int | None, tensor: torch.Tensor) -> str:
        """Copy in one checkpoint tensor, keeping this rank's columns; returns the parameter
        it went into. `name` is gate, up, down (one expert's [I, H] / [H, I] weight or
        [I] / [H] bias; `expert` given) or gate_up / down for all experts at once
        ([E, 2I, H] with gate rows first, or [E, H, I]); a trailing `_bias` names the bias."""
        cols, inter = self.columns, len(self.columns)
        bias = name.endswith("_bias")
        kind = name.removesuffix("_bias")
        if kind in ("gate", "up"):
            target = (self.b13 if bias else self.w13).data[expert]
            offset = 0 if kind == "gate" else inter
            target[offset : offset + inter].copy_(tensor[cols.start : cols.stop])
            return "b13" if bias else "w13"
        if kind == "gate_up":
            full = tensor.shape[1] // 2
            target = (self.b13 if bias else self.w13).data
            target[:, :inter].copy_(tensor[:, cols.start : cols.stop])
            target[:, inter:].copy_(tensor[:, full + cols.start : full + cols.stop])
            return "b13" if bias else "w13"
        if kind == "down":
            target = (self.b2 if bias else self.w2).data
            if expert is not None:
                target = target[expert]
            target.copy_(tensor if bias else tensor[..., cols.start : cols.stop])
            return "b2" if bias else "w2"
        raise ValueError(f"unknown expert tensor {name!r}")
