"""The attention block of the families beyond Llama (Gemma 3, Qwen3-MoE, Mixtral, gpt-oss,
Phi-3): Llama's fused QKV projection and head split, plus what each of them adds in its
config: per-head Q/K norms, a softmax scale other than head_dim**-0.5, a sliding window on
some layers, per-head attention sinks, biases on every projection, and a rotary table per
layer type."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from radixserve.layers.attention import AttentionBackend, ForwardBatch
from radixserve.layers.linear import RowParallelLinear
from radixserve.layers.rotary import RotaryEmbedding
from radixserve.models.llama import Attention, RMSNorm


def layer_window(config, layer_id: int) -> int | None:
    """The layer's sliding window, or None for full attention (`layer_types` in the config,
    as transformers writes it for Gemma 3, Mistral-style configs and gpt-oss)."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    if types is None:  # Mistral and Mixtral: one window on every layer
        return int(window)
    return int(window) if types[layer_id] == "sliding_attention" else None


class FamilyAttention(Attention):
    def __init__(
        self,
        config,
        layer_id: int,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
        *,
        rope_key: str = "rope",
        qk_norm: Callable[[int, float], nn.Module] | None = None,
        scale: float | None = None,
        sinks: bool = False,
        o_bias: bool = False,
    ) -> None:
        super().__init__(config, layer_id, rotary, backend)
        self.qk_norm = qk_norm is not None
        if qk_norm is not None:
            self.q_norm = qk_norm(self.head_dim, config.rms_norm_eps)
            self.k_norm = qk_norm(self.head_dim, config.rms_norm_eps)
        if o_bias:
            self.o_proj = RowParallelLinear(self.q_size, config.hidden_size, bias=True)
        if scale is not None:
            self.scale = scale
        self.rope_key = rope_key
        self.window = layer_window(config, layer_id)
        # this rank's heads' sink logits (gpt-oss), loaded like any other tensor
        self.sinks = nn.Parameter(torch.empty(self.num_heads)) if sinks else None

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], -1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        qk = self.rotary.apply(torch.cat([q, k], 1), batch.metadata[self.rope_key])
        q, k = qk.split([self.num_heads, self.num_kv_heads], 1)
        o = self.backend.forward(
            q,
            k,
            v.reshape(-1, self.num_kv_heads, self.head_dim),
            self.layer_id,
            batch,
            self.scale,
            window=self.window,
            sinks=self.sinks,
        )
        return self.o_proj(o.reshape(-1, self.q_size))


def norms_to_float32(model: nn.Module, offset: float = 0.0) -> None:
    """The float32 copy each RMSNorm multiplies by, made once after loading; Gemma stores
    its norm weights as w where the scale is 1 + w (offset 1)."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight32 = module.weight.detach().float() + offset
