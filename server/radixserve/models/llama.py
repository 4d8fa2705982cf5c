"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2) on our attention interface.

Q, K and V are one fused projection and gate/up another, so a layer runs three matmuls
instead of seven; `load_weights` fuses the checkpoint's separate tensors as it reads them.
Qwen2 adds a bias to QKV, Qwen3 normalises Q and K per head; everything else is shared.

Under tensor parallelism each rank builds the layers with its own share (query and KV heads
from `shard_heads`, MLP columns and vocabulary rows from `split_range`) and `load_weights`
copies in only the rows or columns of the checkpoint tensors that share covers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.layers import cpu_kernels
from radixserve.layers.attention import AttentionBackend, ForwardBatch
from radixserve.layers.linear import (
    SMALL_BATCH_ROWS,
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    lm_logits,
)
from radixserve.layers.lora import LoraBatch, LoraSlots
from radixserve.layers.parallel import shard_heads, split_range, tp_rank, tp_size
from radixserve.layers.rotary import RotaryEmbedding

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.weight32: torch.Tensor | None = None  # float32 copy, made once after loading
        # radixserve's CPU kernel for decode batches (set with the int4 path, which is lossy
        # anyway: its float32 sums run in another order than torch's)
        self.cpu_kernel = False

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        """RMSNorm of x, after `x += delta` in place when a delta is given (the residual
        stream's add, fused with the norm that reads it)."""
        w = self.weight32 if self.weight32 is not None else self.weight.float()
        if (
            self.cpu_kernel
            and x.dim() == 2
            and x.shape[0] <= SMALL_BATCH_ROWS
            and x.dtype == torch.float32
            and x.is_contiguous()
            and x.shape[1] % 8 == 0
        ):
            return cpu_kernels.add_rms_norm(x, delta, w, self.eps, self.weight.dtype)
        if delta is not None:
            x.add_(delta)
        # computed in float32 as the reference does; the result is in the weights' dtype,
        # so a float32 residual stream feeds bfloat16 matmuls
        return F.rms_norm(x.float(), (x.shape[-1],), w, self.eps).to(self.weight.dtype)


class Attention(nn.Module):
    def __init__(self, config, layer_id: int, rotary: RotaryEmbedding, backend: AttentionBackend):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        # this rank's heads (all of them with one rank)
        self.heads, self.kv_heads = shard_heads(
            config.num_attention_heads, config.num_key_value_heads, tp_size(), tp_rank()
        )
        self.num_heads = len(self.heads)
        self.num_kv_heads = len(self.kv_heads)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=bias
        )
        self.o_proj = RowParallelLinear(self.q_size, config.hidden_size, bias=False)
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.scale = self.head_dim**-0.5
        self.rotary = rotary
        self.backend = backend

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        lora = batch.metadata.get("lora")
        qkv = self.qkv_proj(x, lora)
        v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = qkv[:, : self.q_size + self.kv_size].split([self.q_size, self.kv_size], -1)
            q = self.q_norm(q.reshape(-1, self.num_heads, self.head_dim))
            k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim))
            qk = torch.cat([q, k], 1)
        else:
            qk = qkv[:, : self.q_size + self.kv_size].view(
                -1, self.num_heads + self.num_kv_heads, self.head_dim
            )
        # one rotation for the query and key heads together
        qk = self.rotary.apply(qk, batch.metadata["rope"])
        q, k = qk.split([self.num_heads, self.num_kv_heads], 1)
        o = self.backend.forward(q, k, v, self.layer_id, batch, self.scale)
        return self.o_proj(o.reshape(-1, self.q_size), lora)


class MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        start, end = split_range(config.intermediate_size, tp_size(), tp_rank())
        self.columns = range(start, end)  # this rank's intermediate columns
        self.inter = end - start
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, 2 * self.inter, bias=bias)
        self.down_proj = RowParallelLinear(self.inter, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, lora: LoraBatch | None = None) -> torch.Tensor:
        gate_up = self.gate_up_proj(x, lora)
        if self.gate_up_proj.int4_kernel is not None and x.shape[0] <= SMALL_BATCH_ROWS:
            return self.down_proj(cpu_kernels.silu_mul(gate_up), lora)  # one call, not three
        gate, up = gate_up.split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up, lora)


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_id: int, rotary: RotaryEmbedding, backend: AttentionBackend):
        super().__init__()
        self.self_attn = Attention(config, layer_id, rotary, backend)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # x is the float32 residual stream: adding small updates to large hidden states in
        # bfloat16 loses enough precision to flip greedy tokens between batch shapes
        # in place: the stream is this forward's own tensor (adding a bfloat16 update to a
        # float32 tensor in place promotes it without a separate conversion)
        # the attention's output joins the stream inside the second norm
        h = self.post_attention_layernorm(x, self.self_attn(self.input_layernorm(x), batch))
        return x.add_(self.mlp(h, batch.metadata.get("lora")))


class LlamaForCausalLM(nn.Module):
    # layers/cpu_decode.FusedDecode where the int4 CPU path runs decode steps in one call
    fused_decode = None

    def __init__(self, config, backend: AttentionBackend, max_positions: int) -> None:
        super().__init__()
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {config.model_type!r} is not supported; expected one of "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.config = config
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.rotary = RotaryEmbedding(config, head_dim, max_positions)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, self.rotary, backend) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states after the final norm, one row per token of the step."""
        x = self.embed_tokens(batch.input_ids).float()
        if self.fused_decode is not None:  # a decode step on the int4 path: one call
            out = self.fused_decode.run(x, batch)
            if out is not None:
                return out
        batch.metadata["rope"] = self.rotary.lookup(batch.positions, self.embed_tokens.weight.dtype)
        for layer in self.layers:
            x = layer(x, batch)
        return self.norm(x)

    def lora_targets(self) -> dict[str, tuple[str, int, int, int]]:
        """PEFT's target module names -> (our projection's attribute path in a layer, part,
        in features, out features of the part)."""
        attn, mlp = self.layers[0].self_attn, self.layers[0].mlp
        h = self.config.hidden_size
        return {
            "q_proj": ("self_attn.qkv_proj", 0, h, attn.q_size),
            "k_proj": ("self_attn.qkv_proj", 1, h, attn.kv_size),
            "v_proj": ("self_attn.qkv_proj", 2, h, attn.kv_size),
            "o_proj": ("self_attn.o_proj", 0, attn.q_size, h),
            "gate_proj": ("mlp.gate_up_proj", 0, h, mlp.inter),
            "up_proj": ("mlp.gate_up_proj", 1, h, mlp.inter),
            "down_proj": ("mlp.down_proj", 0, mlp.inter, h),
        }

    def init_lora_slots(self, num_slots: int, max_rank: int) -> None:
        """Give every projection its adapter weight slots (zero: no adapter)."""
        parts: dict[str, list[tuple[int, int]]] = {}
        for path, _part, fan_in, fan_out in self.lora_targets().values():
            parts.setdefault(path, []).append((fan_in, fan_out))
        for layer in self.layers:
            for path, shapes in parts.items():
                proj = layer.get_submodule(path)
                w = proj.weight
                proj.lora = LoraSlots(
                    num_slots, max_rank, shapes[0][0], [o for _, o in shapes], w.dtype, w.device
                )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits over the whole vocabulary, on every rank."""
        return lm_logits(hidden, self.embed_tokens if self.tie_word_embeddings else self.lm_head)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors in, fusing q/k/v and gate/up and keeping this rank's
        share of each split tensor; fail on anything missing."""
        params = dict(self.named_parameters())
        fused = {
            "q_proj": ("qkv_proj", 0),
            "k_proj": ("qkv_proj", 1),
            "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0),
            "up_proj": ("gate_up_proj", 1),
        }
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            if self._load_other(name, tensor, loaded):
                continue
            part = next((p for p in fused if f".{p}." in name), None)
            if part is None:
                if name not in params:
                    continue
                params[name].data.copy_(self._local_part(name, tensor))
                loaded.add(name)
                continue
            target, shard = fused[part]
            pname = name.replace(part, target)
            param = params[pname]
            parts = self._fused_parts(pname)
            rows, offset = parts[shard], sum(len(r) for r in parts[:shard])
            param.data[offset : offset + len(rows)].copy_(tensor[rows.start : rows.stop])
            loaded.add(f"{pname}#{shard}")
        expected = set()
        for pname in params:
            if ".qkv_proj." in pname:
                expected |= {f"{pname}#{i}" for i in range(3)}
            elif ".gate_up_proj." in pname:
                expected |= {f"{pname}#{i}" for i in range(2)}
            else:
                expected.add(pname)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight32 = module.weight.detach().float()

    def _load_other(self, name: str, tensor: torch.Tensor, loaded: set[str]) -> bool:
        """A family's own tensors (experts of a MoE): loaded, and their parameter names added
        to `loaded`, by the subclass; False for everything Llama's rules handle."""
        return False

    def _fused_parts(self, pname: str) -> list[range]:
        """Checkpoint rows of each part of a fused projection that this rank holds."""
        layer = self.layers[int(pname.split(".")[1])]
        if ".gate_up_proj." in pname:
            return [layer.mlp.columns, layer.mlp.columns]
        attn = layer.self_attn
        d = attn.head_dim
        q = range(attn.heads.start * d, attn.heads.stop * d)
        kv = range(attn.kv_heads.start * d, attn.kv_heads.stop * d)
        return [q, kv, kv]

    def _local_part(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice of an unfused tensor: input columns of the row-parallel
        projections, vocabulary rows of the embedding and head, all of anything else."""
        if tp_size() == 1:
            return tensor
        if name in ("embed_tokens.weight", "lm_head.weight"):
            head = self.embed_tokens if name == "embed_tokens.weight" else self.lm_head
            return tensor[head.vocab_start : head.vocab_end]
        if name.endswith(".weight") and (".o_proj." in name or ".down_proj." in name):
            layer = self.layers[int(name.split(".")[1])]
            if ".o_proj." in name:
                d = layer.self_attn.head_dim
                heads = layer.self_attn.heads
                return tensor[:, heads.start * d : heads.stop * d]
            cols = layer.mlp.columns
            return tensor[:, cols.start : cols.stop]
        return tensor
