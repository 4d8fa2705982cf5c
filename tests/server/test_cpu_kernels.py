"""radixserve's CPU kernels (layers/csrc/cpu_kernels.c): the int4 matmul's arithmetic, its
layout, where it is used, the fallback to torch's kernel when it cannot be built, and the
fused element-wise steps and one-stream attention against torch's own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from radixserve.layers import cpu_kernels
from radixserve.layers.attention.torch_backend import _decode_attention
from radixserve.layers.linear import (
    SMALL_BATCH_ROWS,
    ColumnParallelLinear,
    VocabParallelEmbedding,
    lm_logits,
)

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available()[0],
    reason=f"the int4 kernel is not here: {cpu_kernels.available()[1]}",
)


def grid_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """A weight on a 4-bit grid per group of 32 with float16 scales and minimums, as a
    Q4_1 GGUF block holds it (its quantizer maps each block's minimum and maximum to levels
    0 and 15)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    scale = (torch.rand(n, k // 32, 1, generator=g) * 0.01 + 1e-3).half().float()
    low = (-8 * scale * torch.rand(n, k // 32, 1, generator=g)).half().float()
    return (q * scale + low).reshape(n, k)


def emulate(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in float64: activations rounded to int16 per row and group
    of 32 (scale amax / 32767), times the weight's integer levels, plus minimum x exact sum."""
    m, k = x.shape
    q, scale, low = cpu_kernels.quantize_groups(w)
    scale, low = scale.half().double(), low.half().double()
    xg = x.double().view(m, k // 32, 32)
    dx = xg.abs().amax(-1) / 32767
    xq = torch.round(xg / torch.where(dx > 0, dx, 1)[..., None])
    dots = torch.einsum("mgi,ngi->mng", xq, q.double().view(w.shape[0], k // 32, 32))
    return (dots * scale[None] * dx[:, None]).sum(-1) + (low[None] * xg.sum(-1)[:, None]).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), [(960, 576), (576, 1536), (8, 32), (40, 64)])
def test_kernel_computes_the_int16_activation_product(dtype, n, k):
    w = grid_weight(n, k, seed=n + k)
    packed = cpu_kernels.pack(w)
    g = torch.Generator().manual_seed(n * k)
    for rows in (1, 2, 3, 4, 5, 8):
        x = torch.randn(rows, k, generator=g) * (torch.rand(rows, 1, generator=g) + 0.1) * 4
        x = x.to(dtype)
        if k > 32:
            x[0, :32] = 0  # an all-zero group: scale 0, no division by it
        out = cpu_kernels.mm(x, packed)
        assert out.dtype == dtype and out.shape == (rows, n)
        want = emulate(x.float(), w)
        big = float(want.abs().max())  # float32 sums: exact to a few ulps of the largest
        if dtype == torch.float32:
            torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=5e-5 * big)
        else:  # the output is rounded to bfloat16 once
            torch.testing.assert_close(out.double(), want, rtol=8e-3, atol=1e-3 * big)
        # and int16 activations keep it close to the float product
        exact = x.double() @ w.double().t()
        err = (out.double() - exact).norm() / exact.norm()
        assert err < (1e-4 if dtype == torch.float32 else 8e-3), err


def test_pack_is_exact_on_a_4bit_grid_and_refuses_other_shapes():
    w = grid_weight(64, 128, seed=3)
    assert torch.equal(cpu_kernels.dequantize(cpu_kernels.pack(w)), w)
    assert cpu_kernels.pack(torch.randn(64, 100)) is None  # inputs not a multiple of 32
    assert cpu_kernels.pack(torch.randn(60, 128)) is None  # outputs not a multiple of 8


def test_linear_takes_the_kernel_for_the_rows_it_wins_at():
    lin = ColumnParallelLinear(128, 96, bias=True)
    with torch.no_grad():
        lin.weight.copy_(grid_weight(96, 128, seed=5))
        lin.bias.copy_(torch.randn(96))
    assert lin.quantize_int4() and lin.int4_kernel is not None
    x = torch.randn(SMALL_BATCH_ROWS, 128)
    rows = cpu_kernels.max_rows()
    # the kernel's product is bit-for-bit what a direct call gives, bias added once
    assert torch.equal(lin(x[:rows]), cpu_kernels.mm(x[:rows], lin.int4_kernel) + lin.bias)
    if rows < SMALL_BATCH_ROWS:  # the other small batches keep torch's kernel
        assert lin.int4 is not None
        assert not torch.equal(lin(x), cpu_kernels.mm(x, lin.int4_kernel) + lin.bias)


def _probe(env: dict[str, str]) -> str:
    """available() and the CPU path's int4 line in a fresh process (both are cached)."""
    code = (
        "from radixserve.layers import cpu_kernels; from radixserve.engine import cpu_path; "
        "print(cpu_kernels.available()); print(cpu_path.int4_kernel_choice())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_falls_back_to_torch_when_the_kernel_does_not_build(tmp_path):
    out = _probe({"CC": "false", "XDG_CACHE_HOME": str(tmp_path)})
    assert "(False, 'it did not build" in out
    assert "torch's int4 kernel (radixserve's: it did not build" in out
    out = _probe({"RADIXSERVE_INT4_KERNEL": "torch"})
    assert "torch's int4 kernel (radixserve's: RADIXSERVE_INT4_KERNEL=torch" in out


def test_builds_into_the_cache_once(tmp_path):
    out = _probe({"XDG_CACHE_HOME": str(tmp_path)})
    assert "(True, 'ok')" in out
    built = list((tmp_path / "radixserve" / "kernels").glob("cpu_kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    _probe({"XDG_CACHE_HOME": str(tmp_path)})
    assert built[0].stat().st_mtime_ns == stamp  # loaded from the cache, not rebuilt


def test_avx2_build_gives_the_same_bits(tmp_path):
    """The AVX2 build (what ATEN_CPU_CAPABILITY=avx2 and AVX2 CPUs get) and the build this
    machine uses (VNNI where there is one) do the same integer sums: equal outputs."""
    w = grid_weight(96, 576, seed=7)
    x = torch.randn(5, 576)
    torch.save((w, x), tmp_path / "case.pt")
    code = (
        "import torch; from radixserve.layers import cpu_kernels; "
        f"w, x = torch.load({str(tmp_path / 'case.pt')!r}); "
        "assert cpu_kernels._flags() == cpu_kernels.FLAGS, cpu_kernels._flags(); "
        f"torch.save(cpu_kernels.mm(x, cpu_kernels.pack(w)), {str(tmp_path / 'out.pt')!r})"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert torch.equal(torch.load(tmp_path / "out.pt"), cpu_kernels.mm(x, cpu_kernels.pack(w)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_and_silu_mul_match_torch(dtype):
    x = torch.randn(3, 576) * 4
    delta = torch.randn(3, 576).to(dtype)
    w = torch.rand(576) + 0.5
    want_x = x + delta.float()
    want = F.rms_norm(want_x, (576,), w, 1e-5).to(dtype)
    got = cpu_kernels.add_rms_norm(x, delta, w, 1e-5, dtype)
    assert torch.equal(x, want_x)  # the residual stream took the delta in place
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=0)
    torch.testing.assert_close(
        cpu_kernels.add_rms_norm(want_x.clone(), None, w, 1e-5, dtype), want, rtol=8e-3, atol=0
    )
    gate_up = torch.randn(2, 3072).to(dtype) * 3
    gate, up = gate_up.split(1536, -1)
    want = F.silu(gate) * up
    got = cpu_kernels.silu_mul(gate_up)
    if dtype == torch.bfloat16:  # rounded where torch rounds: the same bits
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 5, 300, 1100])
def test_decode_attention_matches_the_torch_path(dtype, n):
    """One request over a run of pool slots, grouped query heads (9 over 3), against the
    torch backend's own decode attention on the same slots."""
    k_buffer = torch.randn(3, 1500, 64).to(dtype)
    v_buffer = torch.randn(3, 1500, 64).to(dtype)
    q = torch.randn(9, 64).to(dtype)
    got = cpu_kernels.decode_attention(q, k_buffer, v_buffer, 37, n, 0.125)
    kd = k_buffer[:, 37 : 37 + n].unsqueeze(1).float()
    vd = v_buffer[:, 37 : 37 + n].unsqueeze(1).float()
    want = _decode_attention(q[None].float(), kd, vd, None, 0.125)[0]
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_int4_lm_head_rescores_its_leaders_exactly():
    """The int4 head's approximate logits pick the leaders; their logits, and so the greedy
    token, come back exact (float32 from the dense rows)."""
    head = VocabParallelEmbedding(4096, 64)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        head.weight.copy_(torch.randn(4096, 64, generator=g))
    assert head.quantize_int4()
    rows = min(cpu_kernels.max_rows(), 4)
    hidden = head.weight[torch.tensor([5, 900, 4000, 17])[:rows]].detach() * 0.5
    hidden += torch.randn(hidden.shape, generator=g) * 0.3
    got = lm_logits(hidden, head)
    dense = hidden @ head.weight.t()
    assert torch.equal(got.argmax(-1), dense.argmax(-1))
    top = dense.topk(4, dim=-1).indices
    torch.testing.assert_close(got.gather(-1, top), dense.gather(-1, top), rtol=1e-6, atol=1e-5)
    assert not torch.equal(got, dense)  # the rest of the vocabulary is the int4 estimate
