"""Linear layers split over tensor-parallel ranks (Megatron's scheme).

- ColumnParallelLinear: each rank holds some output rows; its output stays split (the next
  layer consumes exactly those columns), so there is no communication.
- RowParallelLinear: each rank holds the input columns matching the split it receives and
  produces a partial sum; one all-reduce makes it whole. The bias is added once, after.
- VocabParallelEmbedding: each rank holds a contiguous range of vocabulary rows; ids outside
  it look up zeros, and an all-reduce assembles the rows.
- ParallelLMHead logits: each rank scores its vocabulary range; an all-gather joins them.

Modules are built with their local shapes; which rows/columns of a checkpoint tensor a rank
takes is the model's `load_weights` business. With one rank each forward is a plain
F.linear / F.embedding: tensor parallelism costs nothing when it is off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.layers.parallel import (
    all_gather_last_dim,
    all_reduce,
    split_range,
    tp_rank,
    tp_size,
)


class ColumnParallelLinear(nn.Module):
    def __init__(self, in_features: int, local_out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(local_out_features, in_features))
        self.bias = nn.Parameter(torch.empty(local_out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    def __init__(self, local_in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, local_in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.linear(x, self.weight, self.bias)
        out = all_reduce(F.linear(x, self.weight))
        return out + self.bias if self.bias is not None else out


class VocabParallelEmbedding(nn.Module):
    """Embedding rows [vocab_start, vocab_end) of this rank; also the tied LM head."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.shard_sizes = [
            end - start
            for start, end in (split_range(vocab_size, tp_size(), r) for r in range(tp_size()))
        ]
        self.vocab_start, self.vocab_end = split_range(vocab_size, tp_size(), tp_rank())
        self.weight = nn.Parameter(torch.empty(self.vocab_end - self.vocab_start, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(ids, self.weight)
        inside = (ids >= self.vocab_start) & (ids < self.vocab_end)
        local = torch.where(inside, ids - self.vocab_start, 0)
        out = F.embedding(local, self.weight).masked_fill_(~inside.unsqueeze(-1), 0)
        return all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection split like the embedding; logits come back whole on every rank."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return lm_logits(hidden, self)


def lm_logits(hidden: torch.Tensor, head: VocabParallelEmbedding) -> torch.Tensor:
    """Full-vocabulary float32 logits from a vocabulary-split weight (embedding or head)."""
    local = F.linear(hidden, head.weight)
    return all_gather_last_dim(local, head.shard_sizes).float()
