"""gpt-oss: a MoE decoder (models/moe.py's skeleton) with its own attention and experts.

- Attention: biases on Q, K, V and O; one learned sink logit per query head that joins
  every softmax's denominator (the backend's `sinks`); layers alternate a sliding window
  and full attention (`layer_types`); YaRN RoPE.
- Router: a linear layer with bias; the top k logits are kept and softmaxed among
  themselves (layers/moe.topk_softmax).
- Experts: biases on both projections; gate and up interleaved in the checkpoint's
  [E, H, 2I] `gate_up_proj` (even columns gate, odd up) and transposed relative to ours;
  a clamped SwiGLU: gate <= limit, -limit <= up <= limit, out = (up + 1) * gate *
  sigmoid(alpha * gate).

Weights load from Hugging Face folders in bfloat16/float32 (transformers' layout) and from
the released checkpoints, whose experts are MXFP4 (`*_blocks` / `*_scales`, rows the output
features, gate and up rows interleaved): dequantized at load, one expert at a time, into
the model's dtype (layers/mxfp4.py).
"""

from __future__ import annotations

import re
from functools import partial

import torch
from torch import nn

from radixserve.layers.moe import FusedMoE, topk_softmax
from radixserve.layers.mxfp4 import Mxfp4Pairs, dequantize_mxfp4
from radixserve.models.moe import MoeForCausalLM, Router


def clamped_swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class GptOssMoE(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        experts = config.num_local_experts
        self.router = Router(experts, config.hidden_size, bias=True)
        act = partial(clamped_swiglu, alpha=config.swiglu_alpha, limit=config.swiglu_limit)
        self.experts = FusedMoE(
            experts, config.hidden_size, config.intermediate_size, bias=True, activation=act
        )

    def forward(self, x: torch.Tensor, lora: None = None) -> torch.Tensor:
        """`lora`: as SparseMoeBlock's, always None."""
        weights, ids = topk_softmax(self.router(x), self.top_k)
        return self.experts(x, weights, ids)


_EXPERTS = re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?$")
_MXFP4 = re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)_(blocks|scales)$")


class GptOssForCausalLM(MoeForCausalLM):
    attention = {"sinks": True, "o_bias": True}

    @staticmethod
    def attention_extras(config) -> str:
        return "attention sinks and a sliding window"

    def _mlp(self, config, layer_id: int) -> nn.Module:
        return GptOssMoE(config)

    def load_weights(self, weights) -> None:
        self._mxfp4 = Mxfp4Pairs()
        try:
            super().load_weights(weights)
        finally:
            del self._mxfp4

    def _load_other(self, name: str, tensor: torch.Tensor, loaded: set[str]) -> bool:
        if m := _MXFP4.search(name):
            pair = self._mxfp4.add(name, tensor)
            if pair is not None:
                layer, part = int(m[1]), m[2]
                loaded.add(f"layers.{layer}.mlp.experts.{self._load_mxfp4(layer, part, *pair)}")
            return True
        if name.endswith(".self_attn.sinks"):
            heads = self.layers[int(name.split(".")[1])].self_attn.heads
            self.get_parameter(name).data.copy_(tensor[heads.start : heads.stop])
        elif re.search(r"layers\.\d+\.mlp\.router\.(weight|bias)$", name):
            self.get_parameter(name).data.copy_(tensor)  # replicated on every rank
        elif m := _EXPERTS.search(name):
            layer, part, bias = m.groups()
            experts = self.layers[int(layer)].mlp.experts
            if part == "gate_up_proj":
                # [E, (H,) 2I] interleaved -> gate rows then up rows, [E, 2I (, H)]
                t = torch.cat([tensor[..., ::2], tensor[..., 1::2]], -1)
                param = experts.load_expert("gate_up" + (bias or ""), None, t if bias else t.mT)
            else:
                param = experts.load_expert(
                    "down" + (bias or ""), None, tensor if bias else tensor.mT
                )
            name = f"layers.{layer}.mlp.experts.{param}"
        else:
            return False
        loaded.add(name)
        return True

    def _load_mxfp4(self, layer: int, part: str, blocks: torch.Tensor, scales: torch.Tensor) -> str:
        """One layer's MXFP4 experts, dequantized an expert at a time (a whole layer's
        gate_up in float32 is 2 GB for gpt-oss-20b); returns the parameter they went into."""
        experts = self.layers[layer].mlp.experts
        for e in range(blocks.shape[0]):
            w = dequantize_mxfp4(blocks[e], scales[e], torch.float32)  # [out, in]
            if part == "down_proj":
                param = experts.load_expert("down", e, w)
            else:  # rows interleaved: even gate, odd up
                experts.load_expert("gate", e, w[0::2])
                param = experts.load_expert("up", e, w[1::2])
        return param
