"""What a model's forward needs to know about the batch and the KV cache.

A step runs a flat list of tokens: first the tokens of the requests that are prefilling
(any number each, a chunk of a prompt on top of a cached prefix), then one token for each
decoding request. Backends build their own metadata once per step in `init_forward` so
the per-layer `forward` does no Python bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class KVPool:
    """One preallocated K and V tensor per layer, indexed by slot; slot 0 is never handed out.

    Slot 0 is a scratch slot: padded positions in gathered tables point at it, so the
    backends never need bounds checks. The layout is [slot, head, dim] (what FlashInfer's
    page tables address), or with `head_major` [head, slot, dim]: a gather of slots then
    yields one contiguous [tokens, dim] matrix per head, which batched matmuls read as is.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        head_major: bool = False,
    ) -> None:
        self.size = size
        self.head_major = head_major
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (
            (num_kv_heads, size + 1, head_dim) if head_major else (size + 1, num_kv_heads, head_dim)
        )
        self.k_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.clear()

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return (
            2 * num_layers * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
        )

    def clear(self) -> None:
        self.free_slots = torch.arange(1, self.size + 1, dtype=torch.int64)

    def available(self) -> int:
        return int(self.free_slots.numel())

    def alloc(self, n: int) -> torch.Tensor | None:
        """Hand out n slots (CPU int64 tensor), or None when fewer are free."""
        if n > self.free_slots.numel():
            return None
        out = self.free_slots[:n]
        self.free_slots = self.free_slots[n:]
        return out

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self.free_slots = torch.cat([self.free_slots, slots.to(torch.int64).cpu()])

    def set_kv(self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.head_major:
            self.k_buffer[layer][:, loc] = k.transpose(0, 1)
            self.v_buffer[layer][:, loc] = v.transpose(0, 1)
        else:
            self.k_buffer[layer][loc] = k
            self.v_buffer[layer][loc] = v

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `slots` (any shape S) as [heads, *S, dim] (contiguous if head_major)."""
        flat = slots.reshape(-1)
        k, v = self.k_buffer[layer], self.v_buffer[layer]
        if self.head_major:
            shape = (self.num_kv_heads, *slots.shape, self.head_dim)
            return k.index_select(1, flat).view(shape), v.index_select(1, flat).view(shape)
        # index_select on rows is a plain row copy; advanced indexing is several times slower
        rows = (*slots.shape, self.num_kv_heads, self.head_dim)
        kr = k.view(k.shape[0], -1).index_select(0, flat).view(rows)
        vr = v.view(v.shape[0], -1).index_select(0, flat).view(rows)
        return kr.movedim(-2, 0), vr.movedim(-2, 0)


@dataclass
class ForwardBatch:
    """The tensors of one step; built by the model runner, read by the model and backend."""

    input_ids: torch.Tensor  # [T] token ids
    positions: torch.Tensor  # [T] absolute positions
    out_cache_loc: torch.Tensor  # [T] slot each token's K/V is written to
    kv_pool: KVPool
    num_prefill_reqs: int
    num_prefill_tokens: int
    prefix_lens: list[int]  # per request: tokens already in the cache before this step
    extend_lens: list[int]  # per request: tokens computed in this step (1 for decode)
    req_slots: list[torch.Tensor]  # per request: all slots of its sequence, this step's included
    metadata: dict = field(default_factory=dict)
    lora_slots: list[int] | None = None  # per request: its adapter's weight slot, -1 = base

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens)

    @property
    def seq_lens(self) -> list[int]:
        return [p + e for p, e in zip(self.prefix_lens, self.extend_lens, strict=True)]


class AttentionBackend:
    """Interface: prepare once per step, then attend once per layer."""

    kv_head_major = False  # the KVPool layout this backend reads best
    supports_window_and_sinks = False  # the forward's optional arguments

    def init_forward(self, batch: ForwardBatch) -> None:
        raise NotImplementedError

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
        window: int | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """`window`: a query sees only the last `window` keys up to itself (its own
        included), as transformers' sliding-window mask; the pool still holds every key.
        `sinks`: one logit per query head that joins each softmax's denominator only
        (gpt-oss)."""
        raise NotImplementedError
