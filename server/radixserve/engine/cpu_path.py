"""Which CPU path `--dtype auto` / `--quantization auto` take, per x86 class, and why.

The fastest way to run a small model's decode step differs by CPU generation, so the
choice is made from what the machine runs natively (as torch and oneDNN see it, so that
`ATEN_CPU_CAPABILITY=avx2` / `ONEDNN_MAX_CPU_ISA=AVX2` restrict it the way they restrict
the kernels). Each rule below was measured on the class it names; docs/engine.md has the
figures.

- bf16: bfloat16 is native (AVX-512-BF16 or AMX: Zen 4+, Sapphire Rapids+). bfloat16
  weights and activations, plus weight-only int4 from a 4-bit GGUF (exact) for decode
  batches of up to 8 and an int8 LM head: bfloat16 matmuls are about 2x float32 there.
- avx512 / avx2: no native bfloat16 (Zen 2/3, Haswell to Skylake, Skylake-SP, Ice Lake).
  bfloat16 is emulated (slower than float32) and torch's int4 kernel wants bfloat16
  activations, so float32, exact. `--quantization int8` (int8 weights, dynamic int8
  activations through fbgemm, every linear layer and the LM head) is 1.7-3.4x faster per
  decode step here (Zen 3, 2 threads) but fbgemm quantizes each call's activations with
  one scale for the whole tensor (7-bit on AVX2): its teacher-forced top-1 agreement with
  float32 on the default model measured 51%, far below llama.cpp's per-block Q8
  activations, so `auto` does not pick it (docs/engine.md).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CpuPath:
    """The chosen CPU path; shown in the start-up log and in /server_info."""

    cpu_class: str  # bf16 | avx512 | avx2 | other
    capability: str  # torch's kernel dispatch level (ATEN_CPU_CAPABILITY)
    dtype: str
    quantization: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def cpu_class() -> tuple[str, str]:
    """(class, torch's capability) of this CPU as torch and oneDNN will run it."""
    capability = torch.backends.cpu.get_cpu_capability()  # honours ATEN_CPU_CAPABILITY
    if capability.startswith("AVX512") and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16", capability
    if capability.startswith("AVX512"):
        return "avx512", capability
    if capability == "AVX2":
        return "avx2", capability
    return "other", capability


def bf16_native() -> bool:
    return cpu_class()[0] == "bf16"


def int8_available() -> bool:
    """fbgemm's dynamic int8 linear needs an x86 CPU with AVX2 at least."""
    return "fbgemm" in torch.backends.quantized.supported_engines and cpu_class()[0] in (
        "bf16",
        "avx512",
        "avx2",
    )


def choose(
    dtype_choice: str, quant_choice: str, int4_exact: bool
) -> tuple[torch.dtype, str, CpuPath]:
    """The CPU dtype and quantization for the flags given; `int4_exact`: the model is a
    4-bit GGUF whose linear weights pack into int4 without loss."""
    klass, capability = cpu_class()
    reasons = []
    if dtype_choice == "auto":
        dtype = torch.bfloat16 if klass == "bf16" else torch.float32
        reasons.append(
            "bfloat16 is native here"
            if klass == "bf16"
            else "no native bfloat16 here (emulated bfloat16 is slower than float32)"
        )
    else:
        dtype = getattr(torch, dtype_choice)
    quant = quant_choice
    if quant_choice == "auto":
        if dtype == torch.bfloat16 and klass == "bf16" and int4_exact:
            quant = "int4"
            reasons.append("the 4-bit GGUF packs into int4 exactly; bfloat16 activations")
        else:
            quant = "none"
            if dtype == torch.float32:
                reasons.append("float32 asked for: the exact mode")
    elif quant_choice == "int8" and not int8_available():
        raise ValueError(
            f"--quantization int8 needs fbgemm on an x86 CPU with AVX2 (this one: {capability})"
        )
    path = CpuPath(
        klass, capability, str(dtype).removeprefix("torch."), quant, "; ".join(reasons) or "asked"
    )
    return dtype, quant, path
