"""Gemma 3 (text): Llama's decoder with what Gemma changes.

- Embeddings are scaled by sqrt(hidden_size) (rounded to the weights' dtype, as the
  reference does).
- Norms scale by 1 + w (checkpoints store w; llama.cpp's GGUF stores 1 + w and
  transformers' GGUF reader subtracts the 1 again, so both arrive as w); each layer has
  four: before and after attention, before and after the MLP, and Q/K are normalised per
  head.
- Layers alternate between a sliding window and full attention (`layer_types`); each kind
  has its own RoPE base (`rope_parameters` per layer type). The KV pool keeps every
  position of every layer: windowed layers only mask (docs/engine.md).
- The softmax scale is query_pre_attn_scalar**-0.5; the MLP is GELU (tanh) gated; final
  logits are soft-capped where the config sets `final_logit_softcapping`. Gemma 3 configs
  carry `attn_logit_softcapping` too, but the reference (transformers' Gemma3Attention)
  never applies it (Gemma 2's did), and neither do we: the released configs leave it null.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.layers.attention import AttentionBackend, ForwardBatch
from radixserve.layers.linear import ParallelLMHead, VocabParallelEmbedding, lm_logits
from radixserve.layers.rotary import RotaryEmbedding
from radixserve.models.attention import FamilyAttention, norms_to_float32
from radixserve.models.llama import MLP, LlamaForCausalLM, RMSNorm

LAYER_TYPES = ("sliding_attention", "full_attention")

# Gemma's turn format for files that carry no template (the Gemma 3 GGUFs llama.cpp writes
# keep none): a system message is folded into the first user turn, the assistant's role is
# called "model", and every turn ends with <end_of_turn>.
CHAT_TEMPLATE = r"""{{- bos_token -}}
{%- set ns = namespace(system='') -%}
{%- for m in messages -%}
{%- if m['role'] == 'system' -%}
{%- set ns.system = ns.system + m['content'] + '\n\n' -%}
{%- else -%}
{{- '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' -}}
{{- ns.system + (m['content'] | trim) + '<end_of_turn>\n' -}}
{%- set ns.system = '' -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"""

# the end of a turn ends generation, beside the config's <eos>
STOP_TOKENS = ("<end_of_turn>",)


class GemmaMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config, layer_id: int, rotary: dict, backend: AttentionBackend) -> None:
        super().__init__()
        layer_type = config.layer_types[layer_id]
        self.self_attn = FamilyAttention(
            config,
            layer_id,
            rotary[layer_type],
            backend,
            rope_key=f"rope:{layer_type}",
            qk_norm=RMSNorm,
            scale=config.query_pre_attn_scalar**-0.5,
        )
        self.mlp = GemmaMLP(config)
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # the residual stream stays float32, as in the Llama layers
        attn = self.self_attn(self.input_layernorm(x), batch)
        x = x.add_(self.post_attention_layernorm(attn))
        mlp = self.mlp(self.pre_feedforward_layernorm(x))
        return x.add_(self.post_feedforward_layernorm(mlp))


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Weights load and split over ranks as Llama's do (same names, same fused QKV and
    gate/up); only the modules and the forward differ."""

    def __init__(self, config, backend: AttentionBackend, max_positions: int) -> None:
        nn.Module.__init__(self)
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("Gemma 3 with bidirectional attention is an encoder: not served")
        self.config = config
        self.rotary = nn.ModuleDict(
            {t: RotaryEmbedding(config, config.head_dim, max_positions, t) for t in LAYER_TYPES}
        )
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, i, self.rotary, backend)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        if not self.tie_word_embeddings:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)

    @staticmethod
    def attention_extras(config) -> str:
        """What the attention backend must run beyond causal attention."""
        return "a sliding window"

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        dtype = self.embed_tokens.weight.dtype
        scale = torch.tensor(self.config.hidden_size**0.5, dtype=dtype)
        x = (self.embed_tokens(batch.input_ids) * scale).float()
        for layer_type, rotary in self.rotary.items():
            batch.metadata[f"rope:{layer_type}"] = rotary.lookup(batch.positions, dtype)
        for layer in self.layers:
            x = layer(x, batch)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = lm_logits(hidden, self.embed_tokens if self.tie_word_embeddings else self.lm_head)
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def load_weights(self, weights) -> None:
        super().load_weights(weights)
        norms_to_float32(self, offset=1.0)
