"""Random LoRA adapters in PEFT's on-disk format (`adapter_config.json` +
`adapter_model.safetensors`), for the multi-LoRA benchmarks and tests: their speed and
their paths' agreement depend on the adapters' shapes, not on trained values."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_adapter(
    folder: Path,
    config,
    rank: int,
    seed: int,
    *,
    alpha: int | None = None,
    modules: Sequence[str] = MODULES,
    scale: float = 0.01,
) -> None:
    """An adapter of `rank` on `modules` of every layer of a Llama-shaped `config`, A and B
    normal times `scale`; lora_alpha defaults to the rank (a scaling of 1)."""
    h, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
    }  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module in modules:
            fan_in, fan_out = shapes[module]
            part = "self_attn" if module in MODULES[:4] else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * scale
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * scale
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank if alpha is None else alpha,
        "target_modules": list(modules),
    }
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
