"""Model definitions and loaders, and the registry that picks a model class for a config.

Keyed on the Hugging Face architecture name (`config.architectures[0]`); configs read from
a GGUF carry none, so their `model_type` names the architecture instead. One file per
family; a family's module is imported only when a model of it loads.
"""

from __future__ import annotations

import importlib

from radixserve.models.loader import ModelLoadError, default_model_path

# architecture -> (module, class)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("moe", "Qwen3MoeForCausalLM"),
    "MixtralForCausalLM": ("moe", "MixtralForCausalLM"),
    "GptOssForCausalLM": ("gpt_oss", "GptOssForCausalLM"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
}
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


def architecture(config) -> str:
    """The registry key of a config; ValueError naming what is supported otherwise."""
    names = list(getattr(config, "architectures", None) or [])
    name = names[0] if names else MODEL_TYPES.get(getattr(config, "model_type", ""), "")
    if name not in ARCHITECTURES:
        raise ValueError(
            f"model architecture {name or config.model_type!r} is not supported; expected one "
            f"of {', '.join(sorted(ARCHITECTURES))}"
        )
    return name


def family_module(config):
    return importlib.import_module(f"radixserve.models.{ARCHITECTURES[architecture(config)][0]}")


def model_class(config) -> type:
    return getattr(family_module(config), ARCHITECTURES[architecture(config)][1])


def stop_tokens(config) -> tuple[str, ...]:
    """Tokens that end a turn in the family's chat format, beyond the config's eos."""
    return getattr(family_module(config), "STOP_TOKENS", ())


def chat_template(config) -> str | None:
    """The family's chat template, for files that carry none (Gemma 3 GGUFs)."""
    return getattr(family_module(config), "CHAT_TEMPLATE", None)


__all__ = [
    "ARCHITECTURES",
    "ModelLoadError",
    "architecture",
    "chat_template",
    "default_model_path",
    "model_class",
    "stop_tokens",
]
