"""Phi-3: a Llama-shaped decoder whose checkpoints already fuse Q/K/V (`qkv_proj`) and
gate/up (`gate_up_proj`), with a sliding window on every layer when the config sets one
and LongRoPE scaling (from transformers' initialiser, as every RoPE type here).

The fused checkpoint tensors are cut back into q/k/v and gate/up on the way in, so that
Llama's loader splits them over tensor-parallel ranks like any other model's.
LongRoPE's factors are fixed at start: the short ones, which transformers also uses up to
`original_max_position_embeddings`; beyond that it switches to the long ones and we do not
(serve such contexts with `--context-length` at most that).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from radixserve.models.llama import MLP
from radixserve.models.moe import MoeForCausalLM


class Phi3ForCausalLM(MoeForCausalLM):
    """The shared family skeleton (models/moe.py) with a dense MLP on every layer."""

    supports_cuda_graphs = True

    def __init__(self, config, backend, max_positions: int) -> None:
        if config.rope_parameters.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("Phi-3 configs with partial_rotary_factor below 1 are not supported")
        super().__init__(config, backend, max_positions)

    def _mlp(self, config, layer_id: int) -> nn.Module:
        return MLP(config)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._unfused(weights))

    def _unfused(self, weights) -> Iterator[tuple[str, torch.Tensor]]:
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
        for name, tensor in weights:
            if ".qkv_proj." in name:
                for part, t in zip(
                    ("q_proj", "k_proj", "v_proj"), tensor.split([q, kv, kv]), strict=True
                ):
                    yield name.replace("qkv_proj", part), t
            elif ".gate_up_proj." in name:
                gate, up = tensor.chunk(2)
                yield name.replace("gate_up_proj", "gate_proj"), gate
                yield name.replace("gate_up_proj", "up_proj"), up
            else:
                yield name, tensor
