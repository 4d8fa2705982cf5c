"""The expert layer's two ways of running the experts, and MXFP4 expert weights.

- FusedMoE's grouped-GEMM path (torch's F.grouped_mm, taken on CUDA in bfloat16) gives
  the looped path's output: on the CPU through grouped_mm's CPU fallback (the offsets,
  biases and row order are ours to get right, whatever kernel runs), and marked `gpu` on
  CUDA's kernel against the looped path in bfloat16.
- MXFP4 dequantization: the nibble order and the exponent bias on hand-written bytes, and
  equal to transformers' own dequantizer on random ones.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from radixserve.layers.moe import FusedMoE
from radixserve.layers.mxfp4 import Mxfp4Pairs, dequantize_mxfp4
from radixserve.models.gpt_oss import clamped_swiglu

EXPERTS, HIDDEN, INTER, TOP_K = 6, 64, 48, 2


def random_moe(bias: bool, dtype=torch.float32, device="cpu") -> FusedMoE:
    torch.manual_seed(0)
    act = partial(clamped_swiglu, alpha=1.702, limit=0.5) if bias else None
    moe = FusedMoE(EXPERTS, HIDDEN, INTER, bias=bias, **({"activation": act} if act else {}))
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return moe.to(device=device, dtype=dtype)


def sorted_rows(tokens: int, device="cpu", dtype=torch.float32):
    """A step's rows sorted by expert, expert 1 left without any (an empty group)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, EXPERTS, (tokens * TOP_K,), generator=g)
    ids[ids == 1] = 0
    experts, order = ids.sort(stable=True)
    x = torch.randn(tokens, HIDDEN, generator=g)[order // TOP_K]
    return x.to(device=device, dtype=dtype), experts.to(device)


@pytest.mark.parametrize("bias", [False, True], ids=["silu", "gpt-oss"])
def test_grouped_gemm_path_equals_looped_path_on_cpu(bias):
    moe = random_moe(bias)
    rows, experts = sorted_rows(9)
    assert not moe._grouped_mm_fits(rows)  # the CPU runs the looped path
    with torch.no_grad():
        want = moe._experts_looped(rows, experts)
        got = moe._experts_grouped(rows, experts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bias", [False, True], ids=["silu", "gpt-oss"])
def test_grouped_gemm_kernel_equals_looped_path_on_gpu(bias):
    """bfloat16 rounds differently per kernel: close, not equal."""
    moe = random_moe(bias, torch.bfloat16, "cuda")
    rows, experts = sorted_rows(300, "cuda", torch.bfloat16)
    assert moe._grouped_mm_fits(rows)
    with torch.no_grad():
        want = moe._experts_looped(rows, experts).float()
        got = moe._experts_grouped(rows, experts).float()
    assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()


def test_mxfp4_nibble_order_and_exponent_bias():
    """Byte 0x2B holds e2m1 codes 0xB (low nibble: -1.5, the EARLIER value) and 0x2 (high:
    +1.0); scale byte 128 is 2 ** (128 - 127) = 2, scale 125 is 2 ** -2."""
    blocks = torch.zeros(2, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x2B
    blocks[1, 0, 15] = 0x7F  # -6.0 then +6.0: the block's last two values
    scales = torch.tensor([[128], [125]], dtype=torch.uint8)
    w = dequantize_mxfp4(blocks, scales, torch.float32)
    assert w.shape == (2, 32)
    assert w[0, :3].tolist() == [-3.0, 2.0, 0.0]
    assert w[1, 30:].tolist() == [-1.5, 1.5]
    assert dequantize_mxfp4(blocks, scales, torch.bfloat16).dtype == torch.bfloat16


def test_mxfp4_dequantize_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 2, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(110, 140, (3, 40, 2), generator=g, dtype=torch.uint8)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float32), theirs.mT)


def test_mxfp4_pairs_either_order_and_shape_check():
    pairs = Mxfp4Pairs()
    b, s = torch.zeros(4, 2, 16, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.uint8)
    assert pairs.add("x.gate_up_proj_scales", s) is None
    assert pairs.add("x.down_proj_blocks", b) is None
    got = pairs.add("x.gate_up_proj_blocks", b)
    assert got is not None and got[0] is b and got[1] is s
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(b, s[:, :1], torch.float32)
