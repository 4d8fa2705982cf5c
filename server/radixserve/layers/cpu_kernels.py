"""radixserve's own CPU kernels (csrc/cpu_kernels.c) for the decode step of
`--quantization int4`: an int4 matmul, and the residual add + RMSNorm and SiLU x up around
it, compiled once per machine with the C compiler already there, loaded with ctypes.

Why: torch's CPU int4 kernel turns each weight into a float before multiplying; at one row
that arithmetic bounds it, and at AVX2 dispatch it does so up to eight rows. This kernel
keeps the weights integers and quantizes the activations to int16 per group of 32 (finer
than the bfloat16 rounding torch's kernel gives them), so the teacher-forced agreement with
float32 stays where torch's kernel had it (docs/engine.md). Measured on one thread, one
SmolLM2 layer at one row: 108 us against torch's 168 us (AVX-512 dispatch) and 305 us
(AVX2 dispatch).

The compiled library is cached under $XDG_CACHE_HOME/radixserve/kernels (default
~/.cache), keyed by the source, the flags and the compiler, so a machine compiles it once
(under a second). Where there is no compiler, the CPU lacks AVX2 + FMA or the build fails,
`available()` says why and the int4 path keeps torch's kernel; RADIXSERVE_INT4_KERNEL=torch
asks for torch's kernel everywhere (to compare them).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

GROUP = 32
ROW_BLOCK = 8  # output rows per block of the packed layout
RECORD = 160  # bytes per block and group: 128 of nibbles, 8 float16 scales, 8 minimums
SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.c"
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
# where torch dispatches AVX-512 and the CPU has VNNI: one instruction per multiply-add-add
VNNI_FLAGS = ["-mavx512f", "-mavx512vl", "-mavx512vnni"]
# and where it also has AVX512_BF16: the LoRA delta's bfloat16 dot products
BF16_FLAGS = ["-mavx512bw", "-mavx512bf16"]


def _flags() -> list[str]:
    """AVX2 everywhere; the VNNI build only where torch itself runs AVX-512 (so a restricted
    ATEN_CPU_CAPABILITY=avx2 measures the AVX2 class's kernel) and the CPU has VNNI."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512") and torch.cpu._is_vnni_supported():
        if torch.cpu._is_avx512_bf16_supported():
            return FLAGS + VNNI_FLAGS + BF16_FLAGS
        return FLAGS + VNNI_FLAGS
    return FLAGS


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "radixserve" / "kernels"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _build(cc: str, flags: list[str]) -> Path:
    """The compiled library, from the cache or compiled now (atomically, so processes that
    start together never load a half-written file)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(flags).encode() + version.stdout.encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *flags, "-o", tmp, str(SOURCE), "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-400:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    from radixserve.engine.cpu_path import cpu_class

    if os.environ.get("RADIXSERVE_INT4_KERNEL", "auto") == "torch":
        return None, "RADIXSERVE_INT4_KERNEL=torch asks for torch's"
    klass, capability = cpu_class()
    if klass not in ("bf16", "avx512", "avx2"):
        return None, f"it needs AVX2 and FMA (this CPU runs torch at {capability})"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (cc or gcc, or $CC) to build it"
    try:
        lib = ctypes.CDLL(str(_build(cc, _flags())))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"it did not build: {e}"
    fn = lib.int4_gemm
    fn.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
        ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
    ]  # fmt: skip
    fn.restype = ctypes.c_int
    lib.add_rms_norm.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
        ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
    ]  # fmt: skip
    lib.add_rms_norm.restype = None
    lib.silu_mul.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p
    ]  # fmt: skip
    lib.silu_mul.restype = None
    lib.decode_attention.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
        ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
    ]  # fmt: skip
    lib.decode_attention.restype = ctypes.c_int
    lib.decode_layers.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_float, ctypes.c_int,
        ctypes.c_int, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
    ]  # fmt: skip
    lib.decode_layers.restype = ctypes.c_int
    lib.lora_delta.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
    ]  # fmt: skip
    lib.lora_delta.restype = ctypes.c_int
    return lib, "ok"


def available() -> tuple[bool, str]:
    """(usable here, why not)."""
    lib, why = _library()
    return lib is not None, why


@functools.cache
def max_rows() -> int:
    """Rows up to which this kernel beats torch's int4 kernel (0: not available). Measured
    per SmolLM2 layer (`bench/int4_kernel.py`): with VNNI and at AVX2 dispatch it wins up to
    eight rows; at AVX-512 dispatch without VNNI torch's AVX-512 kernel is as fast from two
    rows up (4 rows: 316 us against the AVX2 build's 348, measured at AVX-512 dispatch
    before the VNNI build existed)."""
    if not available()[0]:
        return 0
    if VNNI_FLAGS[-1] in _flags() or not torch.backends.cpu.get_cpu_capability().startswith(
        "AVX512"
    ):
        return 8
    return 1


@dataclass
class Int4Weight:
    """A linear weight in the kernel's layout: [N/8, K/32, 160] bytes (see csrc/cpu_kernels.c)."""

    records: torch.Tensor
    out_features: int
    in_features: int


def quantize_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q in [0, 15] as uint8 [N, K], scale [N, K/32], minimum [N, K/32]): w = scale * q + min
    per group of 32 inputs, fitted from the group's minimum and maximum; exact for a 4-bit
    GGUF block that uses its lowest and highest level (as Q4_1's quantizer makes it do)."""
    n, k = weight.shape
    groups = weight.detach().float().reshape(n, k // GROUP, GROUP)
    low = groups.amin(-1)
    scale = (groups.amax(-1) - low) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((groups - low[..., None]) / safe[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    return q.reshape(n, k), scale, low


def pack(weight: torch.Tensor) -> Int4Weight | None:
    """The kernel's copy of `weight`, or None where the shape or device does not fit."""
    n, k = weight.shape
    if weight.device.type != "cpu" or k % GROUP or n % ROW_BLOCK:
        return None
    q, scale, low = quantize_groups(weight)
    g, blocks = k // GROUP, n // ROW_BLOCK
    q = q.view(n, g, GROUP)
    nibbles = q[..., :16] | (q[..., 16:] << 4)  # byte 4t + b: q[4t + b] | q[16 + 4t + b] << 4
    nibbles = nibbles.view(blocks, ROW_BLOCK, g, 4, 4).permute(0, 2, 3, 1, 4)  # [nb, g, t, j, b]

    def by_block(t: torch.Tensor) -> torch.Tensor:  # [n, g] -> [nb, g, 8 rows] float16 bytes
        return t.half().view(blocks, ROW_BLOCK, g).transpose(1, 2).contiguous().view(torch.uint8)

    records = torch.cat([nibbles.reshape(blocks, g, 128), by_block(scale), by_block(low)], -1)
    return Int4Weight(records.contiguous(), n, k)


def dequantize(w: Int4Weight) -> torch.Tensor:
    """The float32 weight the kernel multiplies by (for tests and checks)."""
    blocks, g = w.out_features // ROW_BLOCK, w.in_features // GROUP
    rec = w.records.view(blocks, g, RECORD)
    nib = rec[..., :128].reshape(blocks, g, 4, ROW_BLOCK, 4).permute(0, 3, 1, 2, 4)
    q = torch.cat([nib & 15, nib >> 4], -2).reshape(w.out_features, g, GROUP).float()

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().view(torch.float16).float().transpose(1, 2).reshape(-1, g)

    scale, low = rows(rec[..., 128:144]), rows(rec[..., 144:])
    return (q * scale[..., None] + low[..., None]).reshape(w.out_features, w.in_features)


def mm(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x [M, K] (float32 or bfloat16) @ W^T -> [M, N] in x's dtype."""
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"radixserve's int4 kernel is not available: {why}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    x = x.contiguous()
    out = torch.empty(x.shape[0], w.out_features, dtype=x.dtype)
    bf16 = int(x.dtype == torch.bfloat16)
    rc = lib.int4_gemm(
        x.data_ptr(), bf16, x.shape[0], w.in_features, w.records.data_ptr(), w.out_features,
        out.data_ptr(), bf16,
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("radixserve's int4 kernel: out of scratch memory")
    return out


# the kernel's limits on a projection's adapter slots (LORA_MAX_* in csrc/cpu_kernels.c)
LORA_MAX_PARTS, LORA_MAX_CHUNKS, LORA_MAX_RANK = 4, 32, 64


class LoraShape(ctypes.Structure):
    """One projection's adapter-slot layout, as the C side's lora_shape reads it."""

    _fields_ = [
        ("parts", ctypes.c_int), ("in_features", ctypes.c_int), ("out_features", ctypes.c_int),
        ("chunk", ctypes.c_int), ("chunks", ctypes.c_int),
        ("chunk_part", ctypes.c_int * LORA_MAX_CHUNKS),
    ]  # fmt: skip


@functools.cache
def lora_delta_available() -> bool:
    """Whether this build adds LoRA deltas in bfloat16 dot products (CPUs with AVX512_BF16
    where torch runs AVX-512); elsewhere torch's matmuls do it."""
    return available()[0] and "-mavx512bf16" in _flags()


def lora_delta(
    out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bc: torch.Tensor, shape: LoraShape,
    slots: ctypes.Array, ranks: ctypes.Array,
) -> bool:  # fmt: skip
    """out [M, N] += x [M, K] A^T B^T per row with the row's adapter slot (`slots`, -1 for
    none; `ranks` its rank), in place, bfloat16 throughout (see csrc's lora_delta). False,
    touching nothing, where the kernel does not take this call."""
    rc = lib().lora_delta(
        x.data_ptr(), out.data_ptr(), x.shape[0], a.data_ptr(), bc.data_ptr(),
        ctypes.byref(shape), a.shape[1], ctypes.addressof(slots), ctypes.addressof(ranks),
        torch.get_num_threads(),
    )  # fmt: skip
    if rc < 0:
        raise MemoryError("radixserve's LoRA delta: out of memory")
    return rc == 0


def lib() -> ctypes.CDLL:
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"radixserve's CPU kernels are not available: {why}")
    return lib


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, dtype
) -> torch.Tensor:
    """x += delta in place (x: contiguous float32 [M, H]), then RMSNorm(x) * weight (float32)
    in `dtype` (float32 or bfloat16): one call for torch's add, norm and cast."""
    out = torch.empty(x.shape, dtype=dtype)
    if delta is not None:
        delta = delta.contiguous()
        if delta.dtype not in (torch.float32, torch.bfloat16):
            delta = delta.float()
    lib().add_rms_norm(
        x.data_ptr(), None if delta is None else delta.data_ptr(),
        int(delta is not None and delta.dtype == torch.bfloat16), weight.data_ptr(),
        x.shape[0], x.shape[1], eps, out.data_ptr(), int(dtype == torch.bfloat16),
    )  # fmt: skip
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [M, 2I] (float32 or bfloat16), in its dtype."""
    gate_up = gate_up.contiguous()
    m, two_i = gate_up.shape
    out = torch.empty(m, two_i // 2, dtype=gate_up.dtype)
    bf16 = int(gate_up.dtype == torch.bfloat16)
    lib().silu_mul(gate_up.data_ptr(), bf16, m, two_i // 2, out.data_ptr())
    return out


def decode_attention(
    q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, first: int, n: int,
    scale: float,
) -> torch.Tensor:  # fmt: skip
    """One decoding request's attention, q [Hq, D], over pool slots [first, first + n) of
    head-major K/V buffers [Hkv, slots, D]: the torch path's gather, casts, two batched
    matmuls and softmax in one call. Returns [Hq, D] in q's dtype."""
    q = q.contiguous()
    hq, d = q.shape
    hkv = k_buffer.shape[0]
    out = torch.empty(hq, d, dtype=q.dtype)
    rc = lib().decode_attention(
        q.data_ptr(), int(q.dtype == torch.bfloat16), k_buffer.data_ptr(), v_buffer.data_ptr(),
        int(k_buffer.dtype == torch.bfloat16), k_buffer.stride(0), first, n, hq, hkv, d, scale,
        out.data_ptr(), int(q.dtype == torch.bfloat16),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("radixserve's decode attention: out of scratch memory")
    return out
