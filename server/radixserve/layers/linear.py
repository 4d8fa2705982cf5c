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

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.layers import cpu_kernels
from radixserve.layers.lora import LoraBatch, LoraSlots
from radixserve.layers.parallel import (
    all_gather_last_dim,
    all_reduce,
    split_range,
    tp_rank,
    tp_size,
)

# Weight-only int4 for small batches on the CPU: groups of INT4_GROUP input columns share a
# scale and a minimum (the layout of GGUF's Q4_0/Q4_1/Q4_K blocks, which therefore pack
# without loss). Decode at a handful of rows is bound by reading the weights from memory, so
# a quarter of bfloat16's bytes is up to 4x faster there; from SMALL_BATCH_ROWS up the
# matmul turns compute-bound and the dense weight (kept beside the packed one) wins.
INT4_GROUP = 32
SMALL_BATCH_ROWS = 8


def pack_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(packed weight, scales and zeros) for torch's CPU int4 matmul, or None where the
    shape does not fit its kernel. Exact for 4-bit GGUF blocks that use their lowest and
    highest level (cpu_kernels.quantize_groups)."""
    n, k = weight.shape
    if weight.device.type != "cpu" or k % INT4_GROUP or n % 8:
        return None
    q, scale, low = cpu_kernels.quantize_groups(weight)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    # the kernel computes (q - 8) * scale + zero
    scales_zeros = torch.stack([scale, low + 8 * scale], -1).transpose(0, 1).contiguous()
    return packed, scales_zeros.to(torch.bfloat16)  # [k/G, n, 2]


def pack_int8_dynamic(weight: torch.Tensor) -> torch.Tensor | None:
    """fbgemm's packed int8 weight (symmetric, one scale per output row) for torch's dynamic
    quantized linear, which quantizes each call's activations to 8 bits on the fly (as
    llama.cpp's Q8 activations do) and accumulates in int32. None off the CPU or without
    fbgemm."""
    if weight.device.type != "cpu" or "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    torch.backends.quantized.engine = "fbgemm"
    w = weight.detach().float()
    scale = w.abs().amax(1).clamp_min(1e-12).double() / 127
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated, the kernel is not gone
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None)


def int8_dynamic_mm(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    # reduce_range: 7-bit activations, so that AVX2's 16-bit pairwise sums cannot saturate
    out = torch.ops.quantized.linear_dynamic(x.float(), packed, True)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


class LinearBase(nn.Module):
    """A linear layer that may also hold an int4 copy of its weight for small batches, or
    an int8 one for every batch."""

    def __init__(self, out_features: int, in_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.int4: tuple[torch.Tensor, torch.Tensor] | None = None
        self.int8: torch.Tensor | None = None
        self.int4_kernel: cpu_kernels.Int4Weight | None = None  # radixserve's, see cpu_kernels
        self.lora: LoraSlots | None = None  # adapter slots, with --enable-lora

    def with_lora(self, out: torch.Tensor, x: torch.Tensor, lora: LoraBatch | None):
        """The base output plus the step's adapters' deltas (LoRA stays outside the base
        matmul, so the int4/int8 weights serve LoRA requests unchanged)."""
        if lora is None or self.lora is None:
            return out
        return self.lora.add_delta(out, x, lora)

    def quantize_int4(self) -> bool:
        """int4 copies for small batches: radixserve's kernel for the rows it wins at, torch's
        for the rest (the dense weight stays for large batches)."""
        if cpu_kernels.max_rows():
            self.int4_kernel = cpu_kernels.pack(self.weight)
        if cpu_kernels.max_rows() < SMALL_BATCH_ROWS or self.int4_kernel is None:
            self.int4 = pack_int4(self.weight)
        return self.int4 is not None or self.int4_kernel is not None

    def quantize_int8(self) -> bool:
        """Replace the dense weight by fbgemm's int8 one: it serves every batch size."""
        self.int8 = pack_int8_dynamic(self.weight)
        if self.int8 is not None:
            self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)
        return self.int8 is not None

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.int8 is not None:
            out = int8_dynamic_mm(x, self.int8)
            return out + bias if bias is not None else out
        if self.int4_kernel is not None and x.shape[0] <= cpu_kernels.max_rows():
            out = cpu_kernels.mm(x, self.int4_kernel)
            return out + bias if bias is not None else out
        if self.int4 is not None and x.shape[0] <= SMALL_BATCH_ROWS:
            packed, scales_zeros = self.int4
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.to(torch.bfloat16), packed, INT4_GROUP, scales_zeros
            ).to(x.dtype)
            return out + bias if bias is not None else out
        return F.linear(x, self.weight, bias)


class ColumnParallelLinear(LinearBase):
    def __init__(self, in_features: int, local_out_features: int, bias: bool) -> None:
        super().__init__(local_out_features, in_features, bias)

    def forward(self, x: torch.Tensor, lora: LoraBatch | None = None) -> torch.Tensor:
        return self.with_lora(self.matmul(x, self.bias), x, lora)


class RowParallelLinear(LinearBase):
    def __init__(self, local_in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(out_features, local_in_features, bias)

    def forward(self, x: torch.Tensor, lora: LoraBatch | None = None) -> torch.Tensor:
        if tp_size() == 1:
            return self.with_lora(self.matmul(x, self.bias), x, lora)
        # LoRA is refused with tensor parallelism (config.py), so no delta here
        out = all_reduce(self.matmul(x, None))
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
        self.int8: tuple[torch.Tensor, torch.Tensor] | None = None
        self.int8_dynamic: torch.Tensor | None = None
        self.int4_kernel: cpu_kernels.Int4Weight | None = None

    def quantize_int8_dynamic(self) -> bool:
        """fbgemm int8 copy of the head for every batch size (the dense weight stays: it is
        also the embedding table when tied)."""
        self.int8_dynamic = pack_int8_dynamic(self.weight)
        return self.int8_dynamic is not None

    def quantize_int4(self) -> bool:
        """int4 copy (groups of 32, radixserve's kernel) for scoring small batches: half the
        int8 copy's bytes; lossy, like it, and rescored the same way (lm_logits)."""
        if cpu_kernels.max_rows():
            self.int4_kernel = cpu_kernels.pack(self.weight)
        return self.int4_kernel is not None

    def quantize_int8(self) -> bool:
        """Per-row int8 copy for scoring small batches: the head is the largest single
        weight of a small model, read whole at every decode step."""
        if self.weight.device.type != "cpu":
            return False
        w = self.weight.detach().float()
        scale = w.abs().amax(1).clamp_min(1e-12) / 127
        q = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        self.int8 = (q, scale.to(torch.bfloat16))
        return True

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


# Logits of the leading candidates that a lossy head recomputes exactly (see lm_logits).
RESCORE_TOP_K = 16


def lm_logits(hidden: torch.Tensor, head: VocabParallelEmbedding) -> torch.Tensor:
    """Full-vocabulary float32 logits from a vocabulary-split weight (embedding or head).

    A head that is not float32 end to end (the int8 copies, a bfloat16 weight) returns its
    logits rounded to bfloat16 or worse: at a logit of 20 that is a step of 0.125, enough to
    swap the two leading tokens. So its RESCORE_TOP_K best candidates per row are scored
    again in float32 from the dense rows (a gather of k rows, no extra weight pass): the
    greedy token and the candidates that carry the probability mass are exact, the rest of
    the vocabulary keeps the fast approximation."""
    approximate = True
    if head.int8_dynamic is not None:
        local = int8_dynamic_mm(hidden, head.int8_dynamic)
    elif head.int4_kernel is not None and hidden.shape[0] <= cpu_kernels.max_rows():
        local = cpu_kernels.mm(hidden, head.int4_kernel)
    elif head.int8 is not None and hidden.shape[0] <= SMALL_BATCH_ROWS:
        q, scale = head.int8
        local = torch.ops.aten._weight_int8pack_mm(hidden.to(torch.bfloat16), q, scale)
    else:
        local = F.linear(hidden, head.weight)
        approximate = local.dtype != torch.float32
    local = local.float()
    if approximate and 0 < RESCORE_TOP_K < local.shape[-1] and hidden.shape[0]:
        top = local.topk(RESCORE_TOP_K, dim=-1).indices  # [rows, k]
        rows = head.weight[top].float()  # [rows, k, hidden]
        exact = torch.bmm(rows, hidden.float().unsqueeze(-1)).squeeze(-1)
        local.scatter_(-1, top, exact)
    return all_gather_last_dim(local, head.shard_sizes)
