"""Rotary position embedding with every scaling scheme transformers knows.

The inverse frequencies come from transformers' own RoPE initialisers (llama3, yarn,
linear, dynamic, longrope), so scaled models match the reference exactly; we only cache
cos/sin per position and apply them.
"""

from __future__ import annotations

import torch
from torch import nn


def _inv_freq(config, head_dim: int, layer_type: str | None) -> tuple[torch.Tensor, float]:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None:  # Gemma 3 and gpt-oss-like configs: one entry per layer type
        params = params.get(layer_type, params)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unsupported rope_type {rope_type!r} in the model config")
        kw = {"layer_type": layer_type} if layer_type in config.rope_parameters else {}
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), **kw)
        return inv_freq.float(), float(scaling)
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return inv, 1.0


class RotaryEmbedding(nn.Module):
    def __init__(
        self, config, head_dim: int, max_positions: int, layer_type: str | None = None
    ) -> None:
        super().__init__()
        inv_freq, scaling = _inv_freq(config, head_dim, layer_type)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        # the sign of rotate-half folded in: rotated * sin == roll(x) * signed_sin
        half = head_dim // 2
        signed = torch.cat([-emb[:, :half].sin(), emb[:, half:].sin()], -1) * scaling
        self.register_buffer("signed_sin", signed, persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos and signed sin for a step's positions: looked up once, used by every layer
        (inside the model's forward, so a captured CUDA graph recomputes them on replay)."""
        cos = self.cos[positions].unsqueeze(1).to(dtype)
        return cos, self.signed_sin[positions].unsqueeze(1).to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [T, heads, D] (query and key heads alike); Hugging Face Llama's rotate-half."""
        cos, sin = rope
        # not addcmul: in bfloat16 it rounds differently from the reference's x*cos + r*sin,
        # enough to change the default model's greedy answers
        return x * cos + x.roll(x.shape[-1] // 2, -1) * sin
