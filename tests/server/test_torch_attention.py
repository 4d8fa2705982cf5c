"""The CPU attention path: both KV pool layouts store and gather the same K/V, and the
matmul decode attention equals SDPA with GQA over the unpadded keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from radixserve.layers.attention import KVPool
from radixserve.layers.attention.torch_backend import _decode_attention


@pytest.mark.parametrize("head_major", [False, True])
def test_pool_layouts_store_and_gather_alike(head_major):
    pool = KVPool(2, 3, 8, 64, torch.float32, "cpu", head_major=head_major)
    loc = torch.tensor([5, 9, 2, 40])
    k, v = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    pool.set_kv(1, loc, k, v)
    slots = torch.tensor([[9, 5], [40, 2]])
    gk, gv = pool.gather(1, slots)  # [heads, 2, 2, dim]
    assert gk.shape == (3, 2, 2, 8)
    torch.testing.assert_close(gk[:, 0, 0], k[1].reshape(3, 8))
    torch.testing.assert_close(gv[:, 1, 0], v[3].reshape(3, 8))
    assert pool.gather(0, slots)[0].abs().sum() == 0  # other layers untouched


def test_decode_attention_matches_sdpa_with_padding():
    torch.manual_seed(0)
    b, hk, g, d, length = 4, 3, 3, 16, 11
    q = torch.randn(b, hk * g, d)
    k, v = torch.randn(hk, b, length, d), torch.randn(hk, b, length, d)
    lens = [11, 4, 7, 1]
    pad = torch.arange(length)[None, :] >= torch.tensor(lens)[:, None]
    out = _decode_attention(q, k, v, pad, 0.25)
    for i, n in enumerate(lens):
        ref = F.scaled_dot_product_attention(
            q[i][:, None], k[:, i, :n], v[:, i, :n], scale=0.25, enable_gqa=True
        )[:, 0]
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)


def _prefill_group(pre: list[int], ext: list[int], heads: int = 6, kv_heads: int = 2):
    """A step of several prefill requests (some with a cached prefix) and one decode request,
    with a pool holding random K/V for every slot."""
    from radixserve.layers.attention import ForwardBatch

    d = 8
    total = sum(p + e for p, e in zip(pre, ext, strict=True)) + 5
    pool = KVPool(1, kv_heads, d, total + 1, torch.float32, "cpu", head_major=True)
    g = torch.Generator().manual_seed(0)
    pool.set_kv(0, torch.arange(total + 1), *torch.randn(2, total + 1, kv_heads, d, generator=g))
    slots, start = [], 1
    for n in [p + e for p, e in zip(pre, ext, strict=True)] + [5]:
        slots.append(torch.arange(start, start + n))
        start += n
    new = sum(ext) + 1
    loc = torch.cat([s[p:] for s, p in zip(slots, pre + [4], strict=True)])
    batch = ForwardBatch(
        input_ids=torch.zeros(new, dtype=torch.long),
        positions=torch.zeros(new, dtype=torch.long),
        out_cache_loc=loc,
        kv_pool=pool,
        num_prefill_reqs=len(ext),
        num_prefill_tokens=sum(ext),
        prefix_lens=pre + [4],
        extend_lens=ext + [1],
        req_slots=slots,
    )
    q = torch.randn(new, heads, d, generator=g)
    k, v = torch.randn(2, new, kv_heads, d, generator=g)
    return batch, q, k, v


def _backend_out(batch, q, k, v, waste: float, monkeypatch) -> tuple[torch.Tensor, dict]:
    from radixserve.layers.attention import torch_backend

    monkeypatch.setattr(torch_backend, "_PREFILL_PAD_WASTE", waste)
    backend = torch_backend.TorchAttentionBackend()
    batch.metadata.clear()
    backend.init_forward(batch)
    md = batch.metadata["torch"]
    return backend.forward(q, k.clone(), v.clone(), 0, batch, 0.3), md


@pytest.mark.parametrize(("pre", "ext"), [([0, 0, 0], [40, 3, 5]), ([0, 6, 0, 10], [30, 2, 4, 7])])
def test_mixed_length_prefill_runs_each_request_alone_with_the_same_result(pre, ext, monkeypatch):
    """Padding a prefill group to its longest prompt mostly computes padding when lengths
    differ; each request alone must give what the padded group gives."""
    batch, q, k, v = _prefill_group(pre, ext)
    alone, md = _backend_out(batch, q, k, v, 2.0, monkeypatch)
    assert "prefill_each" in md  # these lengths waste more than 2x when padded
    padded, md = _backend_out(batch, q, k, v, float("inf"), monkeypatch)
    assert "prefill_table" in md
    torch.testing.assert_close(alone, padded, rtol=1e-5, atol=1e-5)


def test_equal_length_prefill_stays_one_padded_call(monkeypatch):
    batch, q, k, v = _prefill_group([0, 0, 0], [12, 12, 11])
    _, md = _backend_out(batch, q, k, v, 2.0, monkeypatch)
    assert "prefill_table" in md and "prefill_each" not in md
