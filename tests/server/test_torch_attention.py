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
