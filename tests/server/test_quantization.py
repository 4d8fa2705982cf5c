"""CPU quantization: weight-only int4 for small batches (exact for weights on a 4-bit grid,
what a Q4 GGUF holds; batches above the threshold keep the dense path) and fbgemm's
dynamic int8 for every batch; `auto` picks per CPU class, and the default model answers
correctly with what it picks on this machine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from radixserve.bench.quality import FIXED_PROMPTS, greedy_answers
from radixserve.config import ServerArgs
from radixserve.engine import cpu_path
from radixserve.engine.model_runner import ModelRunner, resolve_quantization
from radixserve.layers.linear import (
    INT4_GROUP,
    SMALL_BATCH_ROWS,
    ColumnParallelLinear,
    VocabParallelEmbedding,
    lm_logits,
    pack_int4,
    pack_int8_dynamic,
)
from radixserve.models.loader import default_model_path, resolve_model


def grid_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A weight whose every group of 32 is min + scale * q, q in 0..15 with both ends used,
    and scale/min exact in bfloat16: the shape of a dequantized Q4_1 tensor."""
    g = torch.Generator().manual_seed(seed)
    groups = k // INT4_GROUP
    q = torch.randint(0, 16, (n, groups, INT4_GROUP), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    scale = (torch.rand(n, groups, 1, generator=g) * 0.01 + 0.001).bfloat16().float()
    low = (-torch.rand(n, groups, 1, generator=g) * 0.08).bfloat16().float()
    return (q * scale + low).reshape(n, k)


def test_int4_pack_is_exact_on_a_4bit_grid():
    w = grid_weight(96, 128)
    packed = pack_int4(w)
    assert packed is not None
    x = torch.randn(3, 128).bfloat16()
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed[0], INT4_GROUP, packed[1])
    ref = F.linear(x.float(), w)
    # only the bfloat16 output rounds: well under one quantisation step of the weights
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_pack_refuses_shapes_the_kernel_cannot_take():
    assert pack_int4(torch.randn(96, 100)) is None  # input not a multiple of the group
    assert pack_int4(torch.randn(90, 128)) is None  # output not a multiple of 8


def test_linear_uses_int4_only_for_small_batches():
    lin = ColumnParallelLinear(128, 96, bias=True).bfloat16()
    with torch.no_grad():
        lin.weight.copy_(grid_weight(96, 128, seed=1))
        lin.bias.copy_(torch.randn(96))
    x = torch.randn(SMALL_BATCH_ROWS + 1, 128).bfloat16()
    dense_small, dense_big = lin(x[:2]), lin(x)
    assert lin.quantize_int4()
    # a changed dense weight shows which path ran: small batches do not read it
    with torch.no_grad():
        lin.weight.zero_()
    small, big = lin(x[:2]), lin(x)
    torch.testing.assert_close(small.float(), dense_small.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(big, F.linear(x, lin.weight, lin.bias))
    assert not torch.allclose(big.float(), dense_big.float())


def test_int8_head_scores_small_batches_close_to_dense():
    head = VocabParallelEmbedding(512, 64).bfloat16()
    with torch.no_grad():
        head.weight.normal_(0, 0.05)
    hidden = torch.randn(2, 64).bfloat16()
    dense = lm_logits(hidden, head)
    assert head.quantize_int8()
    q = lm_logits(hidden, head)
    assert q.dtype == torch.float32
    assert (q - dense).abs().max() < 0.02 * dense.abs().max()
    assert torch.equal(lm_logits(hidden.repeat(8, 1), head)[:2], dense)  # big batch: dense


needs_fbgemm = pytest.mark.skipif(
    pack_int8_dynamic(torch.ones(8, 8)) is None, reason="fbgemm (x86 with AVX2) not available"
)


@needs_fbgemm
def test_int8_linear_is_close_to_dense_at_every_batch_size():
    lin = ColumnParallelLinear(256, 96, bias=True)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        lin.bias.normal_()
    x = torch.randn(40, 256)
    dense = lin(x)
    assert lin.quantize_int8()
    assert lin.weight.numel() == 0  # the dense copy is gone: int8 serves every batch
    for rows in (1, SMALL_BATCH_ROWS + 1, 40):
        q = lin(x[:rows])
        err = (q - dense[:rows]).abs().max()
        assert 0 < err < 0.03 * dense.abs().max()  # lossy, but within int8's rounding


@needs_fbgemm
def test_int8_dynamic_head_keeps_the_embedding_dense():
    head = VocabParallelEmbedding(512, 64)
    with torch.no_grad():
        head.weight.normal_(0, 0.05)
    hidden = torch.randn(20, 64)
    dense = lm_logits(hidden, head)
    assert head.quantize_int8_dynamic()
    q = lm_logits(hidden, head)
    assert q.dtype == torch.float32 and not torch.equal(q, dense)
    assert (q - dense).abs().max() < 0.03 * dense.abs().max()
    ids = torch.tensor([3, 7])
    assert torch.equal(head(ids), head.weight[ids])  # the lookup still reads float32 rows


@pytest.mark.parametrize(
    ("klass", "dtype", "quant"),
    [
        ("bf16", "bfloat16", "int4"),
        ("avx512", "float32", "int4"),
        ("avx2", "float32", "int4"),
        ("other", "float32", "none"),
    ],
)
def test_auto_choice_per_cpu_class(monkeypatch, klass, dtype, quant):
    """The policy of every class, whatever this machine is (its class is faked)."""
    monkeypatch.setattr(cpu_path, "cpu_class", lambda: (klass, "faked"))
    monkeypatch.setattr(cpu_path, "int8_available", lambda: True)
    got_dtype, got_quant, path = cpu_path.choose("auto", "auto", int4_exact=True)
    assert (str(got_dtype), got_quant) == (f"torch.{dtype}", quant)
    assert path.cpu_class == klass and path.reason
    # an explicit float32 is the exact mode on every class
    assert cpu_path.choose("float32", "auto", int4_exact=True)[1] == "none"
    # int4 needs the exact 4-bit packing: a model that is not a Q4 GGUF keeps the dense path
    assert cpu_path.choose("auto", "auto", int4_exact=False)[1] == "none"
    # a dtype that is not the class's own (bfloat16 emulated, float32 where bf16 is native)
    # is taken as asked, without int4
    other = "float32" if klass == "bf16" else "bfloat16"
    assert cpu_path.choose(other, "auto", int4_exact=True)[1] == "none"


def test_auto_quantization_choice():
    gguf = resolve_model(default_model_path())
    expected = "int4" if cpu_path.int4_available() else "none"
    assert resolve_quantization("auto", gguf, "cpu", "auto") == expected
    assert resolve_quantization("auto", gguf, "cpu", "float32") == "none"  # exact mode
    assert resolve_quantization("auto", gguf, "cuda", "auto") == "none"
    assert resolve_quantization("none", gguf, "cpu", "auto") == "none"
    for choice in ("int4", "int8"):
        with pytest.raises(ValueError, match="CPU only"):
            resolve_quantization(choice, gguf, "cuda", "auto")


@pytest.mark.slow
def test_default_model_answers_with_the_auto_path():
    """The default settings on the CPU take this class's path (int4 for small batches beside
    bfloat16 where it is native, beside float32 elsewhere) and still answer the README's
    question right."""
    args = ServerArgs(device="cpu", max_total_tokens=4096)
    runner = ModelRunner(args)
    assert runner.quantization == ("int4" if cpu_path.int4_available() else "none")
    assert runner.dtype == (torch.bfloat16 if cpu_path.bf16_native() else torch.float32)
    assert runner.cpu_path is not None and runner.cpu_path.quantization == runner.quantization
    answer = greedy_answers(args, [FIXED_PROMPTS[0]], max_new_tokens=24, runner=runner)[0]
    assert answer == "The capital of France is Paris."


@pytest.mark.parametrize(
    ("limit", "hardware", "klass"),
    [
        (None, True, "bf16"),
        (None, False, "avx512"),  # Skylake-SP, Ice Lake: AVX-512 without bfloat16
        ("AVX512_CORE_VNNI", True, "avx512"),  # oneDNN held below its bfloat16 ISA
        ("AVX512_CORE_AMX", True, "bf16"),
    ],
)
def test_bf16_class_needs_the_instructions_not_just_avx512(monkeypatch, limit, hardware, klass):
    """torch calls bfloat16 "supported" on every AVX-512 CPU (oneDNN emulates it there), but
    emulated bfloat16 is slower than float32: the bf16 class needs AVX512-BF16 or AMX, and
    oneDNN allowed to use them."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: hardware)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if limit is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", limit)
    assert cpu_path.cpu_class() == (klass, "AVX512")
