"""Mixture-of-experts decoders on Llama's skeleton: Qwen3-MoE and Mixtral.

Each layer is Llama's (attention, two RMSNorms, float32 residual) with the MLP replaced by
a router and a FusedMoE (layers/moe.py). Qwen3-MoE normalises Q and K per head, routes by
softmax then top-k (renormalised when `norm_topk_prob`) and may keep dense MLPs on some
layers (`mlp_only_layers`, `decoder_sparse_step`); Mixtral routes by softmax, top-k,
always renormalised, and may slide a window on every layer. Neither has shared experts.

Expert weights arrive per expert (`experts.{e}.gate_proj` / `w1` ..., the Hugging Face
files) or stacked (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]: what
transformers 5 builds in memory, and so what its GGUF reader returns).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.layers.attention import AttentionBackend
from radixserve.layers.linear import ParallelLMHead, VocabParallelEmbedding
from radixserve.layers.moe import FusedMoE, softmax_topk
from radixserve.layers.rotary import RotaryEmbedding
from radixserve.models.attention import FamilyAttention, layer_window, norms_to_float32
from radixserve.models.llama import MLP, DecoderLayer, LlamaForCausalLM, RMSNorm

# experts.{e}.{part}.{weight|bias} per expert, or experts.{part}[_bias] stacked
_PER_EXPERT = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.(weight|bias)$")
_STACKED = re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?$")
_PARTS = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down"}
_PARTS["w2"] = "down"


class Router(nn.Module):
    """The replicated gate: logits over all experts from the layer's input."""

    def __init__(self, num_experts: int, hidden_size: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.empty(num_experts)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class SparseMoeBlock(nn.Module):
    def __init__(self, config, num_experts: int, inter: int, renormalize: bool) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.renormalize = renormalize
        self.gate = Router(num_experts, config.hidden_size)
        self.experts = FusedMoE(num_experts, config.hidden_size, inter)

    def forward(self, x: torch.Tensor, lora: None = None) -> torch.Tensor:
        """`lora` is what Llama's layer passes its MLP; always None here (the runner refuses
        --enable-lora for these families)."""
        weights, ids = softmax_topk(self.gate(x), self.top_k, self.renormalize)
        return self.experts(x, weights, ids)


class MoeDecoderLayer(DecoderLayer):
    def __init__(self, config, layer_id, rotary, backend, mlp: nn.Module, **attention) -> None:
        nn.Module.__init__(self)
        self.self_attn = FamilyAttention(config, layer_id, rotary, backend, **attention)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MoeForCausalLM(LlamaForCausalLM):
    """Shared by the MoE families: what differs is each layer's MLP (`_mlp`)."""

    attention: dict = {}  # the family's FamilyAttention options
    # the grouped experts read each expert's token count on the host (a sync a captured
    # graph cannot replay); dense families built on this skeleton set it back
    supports_cuda_graphs = False

    def __init__(self, config, backend: AttentionBackend, max_positions: int) -> None:
        nn.Module.__init__(self)
        self.config = config
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        self.rotary = RotaryEmbedding(config, head_dim, max_positions)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            MoeDecoderLayer(config, i, self.rotary, backend, self._mlp(config, i), **self.attention)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)

    @staticmethod
    def attention_extras(config) -> str:
        """What the attention backend must run beyond causal attention."""
        windows = any(layer_window(config, i) for i in range(config.num_hidden_layers))
        return "a sliding window" if windows else ""

    def _mlp(self, config, layer_id: int) -> nn.Module:
        raise NotImplementedError

    def _load_other(self, name: str, tensor: torch.Tensor, loaded: set[str]) -> bool:
        name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's files
        if m := _PER_EXPERT.search(name):
            layer, expert, part, kind = m.groups()
            suffix = "_bias" if kind == "bias" else ""
            experts = self.layers[int(layer)].mlp.experts
            param = experts.load_expert(_PARTS[part] + suffix, int(expert), tensor)
        elif m := _STACKED.search(name):
            layer, part, bias = m.groups()
            experts = self.layers[int(layer)].mlp.experts
            param = experts.load_expert(part.removesuffix("_proj") + (bias or ""), None, tensor)
        elif re.search(r"layers\.\d+\.mlp\.gate\.(weight|bias)$", name):
            self.get_parameter(name).data.copy_(tensor)  # the router: whole on every rank
            loaded.add(name)
            return True
        else:
            return False
        loaded.add(f"layers.{layer}.mlp.experts.{param}")
        return True

    def load_weights(self, weights) -> None:
        super().load_weights(weights)
        norms_to_float32(self)


class Qwen3MoeForCausalLM(MoeForCausalLM):
    attention = {"qk_norm": RMSNorm}

    def _mlp(self, config, layer_id: int) -> nn.Module:
        sparse = (
            layer_id not in (config.mlp_only_layers or [])
            and config.num_experts > 0
            and (layer_id + 1) % config.decoder_sparse_step == 0
        )
        if not sparse:
            return MLP(config)
        return SparseMoeBlock(
            config, config.num_experts, config.moe_intermediate_size, config.norm_topk_prob
        )


class MixtralForCausalLM(MoeForCausalLM):
    def _mlp(self, config, layer_id: int) -> nn.Module:
        return SparseMoeBlock(config, config.num_local_experts, config.intermediate_size, True)
