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
  bfloat16 matmuls are emulated (slower than float32), so float32 stays the dtype of every
  activation, norm, attention and large batch. But a decode step at a few rows is bound by
  reading the weights, and an int4 copy is an eighth of float32's bytes: for a 4-bit GGUF
  the same exact int4 copy as on the bf16 class serves batches of up to 8 rows with the
  int8 LM head, through radixserve's int4 kernel (layers/cpu_kernels.py: int16 activations,
  integer multiply-adds; float32 in and out), or torch's where it cannot be built. Its
  teacher-forced agreement with float32 is at least llama.cpp's (docs/engine.md).
  `--quantization int8` (fbgemm's dynamic int8, one activation scale per tensor) stays an
  opt-in: its agreement measured 49% (Zen 3), far below llama.cpp's per-block Q8.
"""

from __future__ import annotations

import logging
import os
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
    int4_kernel: str = ""  # which int4 matmul serves which decode rows (int4 only)
    decode_step: str = ""  # in one call of radixserve's kernels, or layer by layer and why

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) under which its bfloat16 matmuls still run natively
_ONEDNN_BF16_ISAS = {
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
    "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512",
    "AVX10_1_512_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX10_2_512",
    "AVX10_2_512_AMX_2",
    "ALL",
    "DEFAULT",
}


def bf16_hardware() -> bool:
    """The CPU has bfloat16 instructions (AVX512-BF16 or AMX) and oneDNN may use them.

    torch's own `mkldnn._is_mkldnn_bf16_supported()` is true on every AVX-512 CPU, since
    oneDNN emulates bfloat16 on AVX-512 cores: on a Skylake-SP or Ice Lake that check would
    pick emulated bfloat16, slower than float32. So the instructions are asked for directly,
    and a restricted oneDNN (ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16) counts as without."""
    limit = (
        os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    ).upper()
    if limit and limit not in _ONEDNN_BF16_ISAS:
        return False
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def cpu_class() -> tuple[str, str]:
    """(class, torch's capability) of this CPU as torch and oneDNN will run it."""
    capability = torch.backends.cpu.get_cpu_capability()  # honours ATEN_CPU_CAPABILITY
    if (
        capability.startswith("AVX512")
        and bf16_hardware()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    ):
        return "bf16", capability
    if capability.startswith("AVX512"):
        return "avx512", capability
    if capability == "AVX2":
        return "avx2", capability
    return "other", capability


def bf16_native() -> bool:
    return cpu_class()[0] == "bf16"


def int4_available() -> bool:
    """torch's CPU int4 kernel is vectorised for AVX2 and up."""
    return cpu_class()[0] in ("bf16", "avx512", "avx2")


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
        native_dtype = torch.bfloat16 if klass == "bf16" else torch.float32
        exact_mode = dtype == torch.float32 and dtype_choice != "auto"
        if not exact_mode and dtype == native_dtype and int4_exact and int4_available():
            quant = "int4"
            reasons.append(
                "the 4-bit GGUF packs into int4 exactly: int4 weights and a quantized LM head "
                "for decode batches of up to 8 rows"
            )
        else:
            quant = "none"
            if exact_mode:
                reasons.append("float32 asked for: the exact mode")
            elif not int4_exact:
                reasons.append("not a 4-bit GGUF: no exact int4 copy of the weights")
    elif quant_choice == "int8" and not int8_available():
        raise ValueError(
            f"--quantization int8 needs fbgemm on an x86 CPU with AVX2 (this one: {capability})"
        )
    path = CpuPath(
        klass,
        capability,
        str(dtype).removeprefix("torch."),
        quant,
        "; ".join(reasons) or "asked",
        int4_kernel_choice() if quant == "int4" else "",
    )
    return dtype, quant, path


def int4_kernel_choice() -> str:
    """Which int4 matmul serves which decode batch sizes here (layers/cpu_kernels.py)."""
    from radixserve.layers import cpu_kernels

    rows = cpu_kernels.max_rows()
    if rows == 0:
        return f"torch's int4 kernel (radixserve's: {cpu_kernels.available()[1]})"
    if rows >= 8:
        return (
            "radixserve's CPU kernels for decode batches of 1-8 rows: int4 matmuls and an int4 "
            "LM head (rescored in float32), fused norms, one stream's attention"
        )
    return (
        f"radixserve's int4 kernel for 1-{rows} rows, torch's for {rows + 1}-8; radixserve's "
        "fused norms and one stream's attention"
    )
