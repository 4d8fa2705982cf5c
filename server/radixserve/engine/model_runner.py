"""Loads the model onto its device and runs one forward step on a ForwardBatch."""

from __future__ import annotations

import logging
import os

import torch

from radixserve.config import ServerArgs
from radixserve.layers.attention import ForwardBatch, KVPool, create_attention_backend
from radixserve.models.llama import LlamaForCausalLM
from radixserve.models.loader import iter_weights, load_config, resolve_model

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_CPU_DEFAULT_KV_TOKENS = 131072
_CPU_KV_MEMORY_FRACTION = 0.25


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto` is bfloat16 where the hardware runs it natively, else float32 (or float16)."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


class ModelRunner:
    def __init__(self, args: ServerArgs) -> None:
        self.args = args
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.source = resolve_model(args.model_path)
        self.config = load_config(self.source)
        cfg = self.config
        self.context_length = args.context_length or int(
            getattr(cfg, "max_position_embeddings", 4096)
        )
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.backend_name = args.attention_backend
        self.backend = create_attention_backend(args.attention_backend, self.device, self.num_heads)
        self.backend_name = type(self.backend).__name__.removesuffix("AttentionBackend").lower()

        max_pos = max(self.context_length, int(getattr(cfg, "max_position_embeddings", 0)))
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)  # build parameters in their final dtype, no copy
        try:
            with torch.device(self.device):
                model = LlamaForCausalLM(cfg, self.backend, max_pos)
        finally:
            torch.set_default_dtype(default_dtype)
        model.load_weights(iter_weights(self.source, cfg))
        self.model = model.eval()
        self.vocab_size = cfg.vocab_size
        self.max_total_tokens = self._kv_budget()
        self.pool = KVPool(
            cfg.num_hidden_layers,
            self.num_kv_heads,
            self.head_dim,
            self.max_total_tokens,
            self.dtype,
            self.device,
        )
        logger.info(
            "model %s loaded: %s on %s, %s attention, KV cache %d tokens",
            self.source.path,
            self.dtype,
            self.device,
            self.backend_name,
            self.max_total_tokens,
        )

    def _kv_budget(self) -> int:
        per_token = KVPool.bytes_per_token(
            self.config.num_hidden_layers, self.num_kv_heads, self.head_dim, self.dtype
        )
        if self.args.max_total_tokens:
            return self.args.max_total_tokens
        if self.device.startswith("cuda"):
            free, total = torch.cuda.mem_get_info()
            used_by_others = total - free
            budget = total * self.args.mem_fraction_static - used_by_others
            tokens = int(budget // per_token)
            if tokens < 16:
                raise RuntimeError(
                    "no GPU memory left for the KV cache: raise --mem-fraction-static"
                )
            return tokens
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return int(min(_CPU_DEFAULT_KV_TOKENS, available * _CPU_KV_MEMORY_FRACTION // per_token))

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, logit_rows: torch.Tensor) -> torch.Tensor:
        """Logits (float32) for the rows `logit_rows` of the step's flat token list."""
        self.backend.init_forward(batch)
        hidden = self.model(batch)
        return self.model.compute_logits(hidden[logit_rows])
