"""radixserve's CPU int4 kernel (layers/csrc/int4_gemm.c): the arithmetic it promises, its
layout, where it is used, and the fallback to torch's kernel when it cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from radixserve.layers import int4_cpu
from radixserve.layers.linear import SMALL_BATCH_ROWS, ColumnParallelLinear

pytestmark = pytest.mark.skipif(
    not int4_cpu.available()[0], reason=f"the int4 kernel is not here: {int4_cpu.available()[1]}"
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
    q, scale, low = int4_cpu.quantize_groups(w)
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
    packed = int4_cpu.pack(w)
    for rows in (1, 2, 3, 4, 5, 8):
        x = (torch.randn(rows, k) * torch.rand(rows, 1) * 4).to(dtype)
        if k > 32:
            x[0, :32] = 0  # an all-zero group: scale 0, no division by it
        out = int4_cpu.mm(x, packed)
        assert out.dtype == dtype and out.shape == (rows, n)
        want = emulate(x.float(), w)
        big = float(want.abs().max())  # float32 sums: exact to a few ulps of the largest
        if dtype == torch.float32:
            torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * big)
        else:  # the output is rounded to bfloat16 once
            torch.testing.assert_close(out.double(), want, rtol=8e-3, atol=1e-3 * big)
        # and int16 activations keep it close to the float product
        exact = x.double() @ w.double().t()
        err = (out.double() - exact).norm() / exact.norm()
        assert err < (1e-4 if dtype == torch.float32 else 8e-3), err


def test_pack_is_exact_on_a_4bit_grid_and_refuses_other_shapes():
    w = grid_weight(64, 128, seed=3)
    assert torch.equal(int4_cpu.dequantize(int4_cpu.pack(w)), w)
    assert int4_cpu.pack(torch.randn(64, 100)) is None  # inputs not a multiple of 32
    assert int4_cpu.pack(torch.randn(60, 128)) is None  # outputs not a multiple of 8


def test_linear_takes_the_kernel_for_the_rows_it_wins_at():
    lin = ColumnParallelLinear(128, 96, bias=True)
    with torch.no_grad():
        lin.weight.copy_(grid_weight(96, 128, seed=5))
        lin.bias.copy_(torch.randn(96))
    assert lin.quantize_int4() and lin.int4_kernel is not None
    x = torch.randn(SMALL_BATCH_ROWS, 128)
    rows = int4_cpu.max_rows()
    # the kernel's product is bit-for-bit what a direct call gives, bias added once
    assert torch.equal(lin(x[:rows]), int4_cpu.mm(x[:rows], lin.int4_kernel) + lin.bias)
    if rows < SMALL_BATCH_ROWS:  # the other small batches keep torch's kernel
        assert lin.int4 is not None
        assert not torch.equal(lin(x), int4_cpu.mm(x, lin.int4_kernel) + lin.bias)


def _probe(env: dict[str, str]) -> str:
    """available() and the CPU path's int4 line in a fresh process (both are cached)."""
    code = (
        "from radixserve.layers import int4_cpu; from radixserve.engine import cpu_path; "
        "print(int4_cpu.available()); print(cpu_path.int4_kernel_choice())"
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
    built = list((tmp_path / "radixserve" / "kernels").glob("int4_gemm-*.so"))
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
        "import torch; from radixserve.layers import int4_cpu; "
        f"w, x = torch.load({str(tmp_path / 'case.pt')!r}); "
        "assert int4_cpu._flags() == int4_cpu.FLAGS, int4_cpu._flags(); "
        f"torch.save(int4_cpu.mm(x, int4_cpu.pack(w)), {str(tmp_path / 'out.pt')!r})"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert torch.equal(torch.load(tmp_path / "out.pt"), int4_cpu.mm(x, int4_cpu.pack(w)))
