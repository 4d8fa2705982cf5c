"""A tiny random Qwen3 for the tests that need a model of a given shape (GQA groups, one KV
head, head sizes the kernels treat differently) rather than the default model."""

from __future__ import annotations

from functools import cache

import torch
from radixserve.models.loader import load_tokenizer, resolve_model
from transformers import AutoConfig, AutoModelForCausalLM


@cache
def default_tokenizer():
    """The default model's tokenizer, read from its GGUF once per test process (seconds
    each time) and saved beside every tiny model that needs one."""
    return load_tokenizer(resolve_model(None))


def tiny_qwen3(
    path: str, *, heads: int, kv_heads: int, head_dim: int, with_tokenizer: bool = False, **sizes
) -> str:
    """A random Qwen3 (QK norms, GQA) saved as safetensors at `path`, seeded, with untied
    embeddings. `sizes` sets the rest of the config (hidden_size, vocab_size, ...; two layers
    unless num_hidden_layers says otherwise); `with_tokenizer` saves the default model's
    tokenizer beside it, for tests that go through the front."""
    cfg = AutoConfig.for_model(
        "qwen3",
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=False,
        **{"num_hidden_layers": 2, **sizes},
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random init leaves norms at 1: perturb them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    if with_tokenizer:
        default_tokenizer().save_pretrained(path)
    return path
