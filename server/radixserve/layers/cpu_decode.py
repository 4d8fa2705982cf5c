"""The int4 path's decode step of a Llama-shaped model as one call into radixserve's CPU
kernels (`decode_layers` in csrc/cpu_kernels.c), instead of ~10 Python-dispatched
operations per layer.

Why: at one to eight rows each of those operations computes for a few microseconds and
costs as much again in dispatch; on the default model that overhead was about 40% of the
single-stream step (a one-off cProfile of `bench/decode_step.py`'s step, docs/engine.md). The C loop runs
the same kernels in the same order and rounds where torch's path rounds, so its result is
the per-operation path's bit for bit (tests/server/test_cpu_decode.py checks it).

It takes a step only where everything in it is what the loop computes: a plain Llama or
Mistral stack (no biases, no Q/K norms, one rank), every projection in the kernel's int4
layout, the torch backend's head-major pool in float32 or bfloat16, decode rows only (at
most `max_rows()`). A step whose rows use LoRA adapters runs in the call too, each
projection adding its rows' deltas from the adapters' slot tensors (layers/lora.py), which
loading and unloading adapters write in place, so the pointers gathered once stay valid.
Anything else runs the layers as before.
"""

from __future__ import annotations

import ctypes
import time

import torch

from radixserve.layers import cpu_kernels
from radixserve.layers.attention.base import ForwardBatch
from radixserve.layers.cpu_kernels import LORA_MAX_CHUNKS, LORA_MAX_PARTS, LORA_MAX_RANK
from radixserve.layers.lora import LoraBatch

_DTYPES = (torch.float32, torch.bfloat16)

# Decode rows up to which the one-call step beats the layer-by-layer one, whose batches
# above 8 rows run the dense weights (bfloat16 or float32 matmuls). In process, 256 tokens
# of context, 2 threads (bench/decode_step.py, docs/engine.md): bf16 class 65.7 against
# 89.6 ms at 32 rows, 123.3 against 143.0 at 64; avx2 class (restricted) 96.8 against 163.7
# at 32, 183.0 against 263.3 at 64. The int4 weights are the
# GGUF's own 4-bit values, the ones the dense copy holds, so only the activations' int16
# rounding differs.
MAX_ROWS = 64


def max_rows() -> int:
    """Where the int4 kernel itself wins only at one row (AVX-512 without VNNI), that row."""
    rows = cpu_kernels.max_rows()
    return MAX_ROWS if rows >= 8 else rows


class _LayerWeights(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_void_p)
        for name in ("qkv", "o", "gate_up", "down", "ln_in", "ln_post", "k", "v")
    ]


_PROJS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


class _LoraLayer(ctypes.Structure):
    _fields_ = [("a", ctypes.c_void_p * len(_PROJS)), ("bc", ctypes.c_void_p * len(_PROJS))]


class _LoraArgs(ctypes.Structure):
    _fields_ = [
        ("layers", ctypes.c_void_p), ("shape", cpu_kernels.LoraShape * len(_PROJS)),
        ("max_rank", ctypes.c_int),
        ("slot", ctypes.c_void_p), ("rank", ctypes.c_void_p), ("rows", ctypes.c_int),
    ]  # fmt: skip


def _projections(model) -> list[torch.nn.Module]:
    """Every layer's four projections, in decode_layers' order (layer-major)."""
    return [layer.get_submodule(path) for layer in model.layers for path in _PROJS]


def why_not(model) -> str | None:
    """Why this model's decode steps cannot run as one call (None: they can)."""
    from radixserve.layers.parallel import tp_size
    from radixserve.models.llama import LlamaForCausalLM

    if type(model) is not LlamaForCausalLM:
        return f"{type(model).__name__} has layers of its own"
    if model.config.model_type not in ("llama", "mistral"):
        return f"model_type {model.config.model_type} adds biases or Q/K norms"
    if tp_size() != 1:
        return "tensor parallelism"
    if cpu_kernels.max_rows() == 0:
        return "radixserve's kernels are not available"
    attn = model.layers[0].self_attn
    if attn.head_dim % 8 or attn.head_dim > 256 or attn.num_heads % attn.num_kv_heads:
        return f"head size {attn.head_dim}"
    if model.embed_tokens.weight.dtype not in _DTYPES:
        return f"activations in {model.embed_tokens.weight.dtype}"
    for proj in _projections(model):
        if proj.int4_kernel is None or proj.bias is not None:
            return "a projection without the kernel's int4 copy, or with a bias"
    if not attn.backend.cpu_kernel:
        return "the attention backend is not radixserve's CPU one"
    return None


class ThreadChooser:
    """How many threads a one-call step runs on: all of them or one, whichever has been
    faster lately for steps of this many rows.

    Why not always all: the step is one parallel region with a barrier after each
    operation, so a thread that loses its core to another process stalls every operation
    until it runs again. On the quiet 2-core VM two threads took a single stream's layers
    in 3.9-4.8 ms against one thread's ~5; with a benchmark of another process beside them,
    12.4 against 4.8 (one-off timings, docs/engine.md). So each size keeps a moving average of both, runs the faster, and
    every `explore`-th step times the other once, following the load as it comes and goes.
    """

    def __init__(self, explore: int = 32, alpha: float = 0.25) -> None:
        self.explore = explore
        self.alpha = alpha
        self.avg: dict[tuple[int, int], float] = {}  # (size bucket, threads) -> seconds
        self.steps: dict[int, int] = {}

    @staticmethod
    def bucket(rows: int) -> int:
        return 1 << (rows - 1).bit_length()  # 1, 2, 4, 8, ..., 64: the power of two at or above

    def pick(self, rows: int, threads: int) -> int:
        if threads <= 1:
            return 1
        b = self.bucket(rows)
        n = self.steps[b] = self.steps.get(b, 0) + 1
        many, one = self.avg.get((b, threads)), self.avg.get((b, 1))
        if many is None:
            return threads
        if one is None:
            return 1
        best, other = (threads, 1) if many <= one else (1, threads)
        return other if n % self.explore == 0 else best

    def record(self, rows: int, threads: int, seconds: float) -> None:
        key = (self.bucket(rows), threads)
        old = self.avg.get(key)
        self.avg[key] = seconds if old is None else old + self.alpha * (seconds - old)


class FusedDecode:
    """The pointers `decode_layers` reads, gathered once; the pool's per layer, once per
    pool."""

    def __init__(self, model) -> None:
        self.model = model
        layer = model.layers[0]
        attn = layer.self_attn
        self.shape = (
            model.config.hidden_size, attn.num_heads, attn.num_kv_heads, attn.head_dim,
            layer.mlp.inter,
        )  # fmt: skip
        self.eps = float(layer.input_layernorm.eps)
        self.scale = float(attn.scale)
        self.dtype = model.embed_tokens.weight.dtype
        projs = _projections(model)
        self.layers = (_LayerWeights * len(model.layers))()
        for i, (entry, layer) in enumerate(zip(self.layers, model.layers, strict=True)):
            four = projs[i * len(_PROJS) : (i + 1) * len(_PROJS)]
            entry.qkv, entry.o, entry.gate_up, entry.down = (
                p.int4_kernel.records.data_ptr() for p in four
            )
            entry.ln_in = layer.input_layernorm.weight32.data_ptr()
            entry.ln_post = layer.post_attention_layernorm.weight32.data_ptr()
        self._pool_key: tuple | None = None
        self.threads = ThreadChooser()
        # steps with adapters cost more at the same rows: their own choice, not mixed in
        self.lora_threads = ThreadChooser()
        # the adapters' slot tensors exist before the int4 path is set up (ModelRunner makes
        # its LoraManager first) and loads and unloads write them in place: read once
        with_slots = all(p.lora is not None for p in projs)
        self._lora = self._lora_args(projs) if with_slots else None

    def _lora_args(self, projs: list[torch.nn.Module]) -> _LoraArgs | None:
        """None where some projection's slots are not in the layout the kernel reads (other
        dtype, a higher rank or more parts or chunks than it takes): those steps keep the layers' path."""
        args = _LoraArgs()
        self._lora_layers = (_LoraLayer * len(self.model.layers))()
        args.layers = ctypes.addressof(self._lora_layers)
        args.max_rank = projs[0].lora.a.shape[1]
        for i, proj in enumerate(projs):
            s = proj.lora
            slots, rank, parts, fan_in = s.a.shape
            chunks = len(s.chunk_part)
            if (
                s.a.dtype != self.dtype or s.bc.dtype != self.dtype
                or not (s.a.is_contiguous() and s.bc.is_contiguous())
                or rank != args.max_rank or rank > LORA_MAX_RANK or parts > LORA_MAX_PARTS or chunks > LORA_MAX_CHUNKS
                or fan_in % 8 or s.chunk % 8
            ):  # fmt: skip
                return None
            layer, j = divmod(i, len(_PROJS))
            entry = self._lora_layers[layer]
            entry.a[j], entry.bc[j] = s.a.data_ptr(), s.bc.data_ptr()
            shape = args.shape[j]
            shape.parts, shape.in_features, shape.out_features = parts, fan_in, s.out_features
            shape.chunk, shape.chunks = s.chunk, chunks
            shape.chunk_part[:chunks] = s.chunk_part
        return args

    def _bind_pool(self, pool) -> bool:
        key = (id(pool), pool.k_buffer[0].data_ptr())
        if key == self._pool_key:
            return True
        if not pool.head_major or pool.dtype not in _DTYPES:
            return False
        for entry, k, v in zip(self.layers, pool.k_buffer, pool.v_buffer, strict=True):
            entry.k, entry.v = k.data_ptr(), v.data_ptr()
        self._pool_key = key
        self.head_stride = pool.k_buffer[0].stride(0)
        return True

    def run(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor | None:
        """All layers of a decode step on x (the float32 residual stream, in place) and the
        final norm (the kernel's at every row count, so a row comes out the same in any
        batch); None, touching nothing, where this step is not one the loop computes."""
        m = x.shape[0]
        if (
            batch.num_prefill_reqs
            or m != batch.batch_size
            or m > max_rows()
            or not self._bind_pool(batch.kv_pool)
        ):
            return None
        lora = batch.metadata.get("lora")
        lora_args = None
        if lora is not None:
            if not isinstance(lora, LoraBatch) or batch.lora_slots is None:
                return None
            lora_args = self._lora
            if lora_args is None:
                return None
            row_slot, row_rank = lora.kernel_rows()  # one row per request: m of each
            lora_args.slot = ctypes.addressof(row_slot)
            lora_args.rank = ctypes.addressof(row_rank)
        slots = [s if s.dtype == torch.int64 else s.long() for s in batch.req_slots]
        slots = [s if s.is_contiguous() else s.contiguous() for s in slots]
        rotary = self.model.rotary
        pos = batch.positions
        cos, sin = rotary.cos[pos], rotary.signed_sin[pos]
        if self.dtype != torch.float32:  # the tables in the activations' precision
            cos, sin = cos.to(self.dtype).float(), sin.to(self.dtype).float()
        loc = batch.out_cache_loc.to(torch.int64).contiguous()
        h, hq, hkv, d, inter = self.shape
        bf16 = int(self.dtype == torch.bfloat16)
        chooser = self.threads if lora_args is None else self.lora_threads
        threads = chooser.pick(m, torch.get_num_threads())
        start = time.perf_counter()
        rc = cpu_kernels.lib().decode_layers(
            self.layers, len(self.layers), x.data_ptr(), m, h, hq, hkv, d, inter, self.eps,
            self.scale, bf16, int(batch.kv_pool.dtype == torch.bfloat16), self.head_stride,
            cos.data_ptr(), sin.data_ptr(), loc.data_ptr(),
            (ctypes.c_void_p * m)(*[s.data_ptr() for s in slots]),
            (ctypes.c_int * m)(*[s.numel() for s in slots]), threads,
            ctypes.byref(lora_args) if lora_args is not None else None,
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("radixserve's decode step: out of memory for its buffers")
        chooser.record(m, threads, time.perf_counter() - start)
        norm = self.model.norm
        return cpu_kernels.add_rms_norm(x, None, norm.weight32, norm.eps, self.dtype)
