"""Paged attention with FlashInfer on CUDA (page size 1: a slot is a page).

Written against FlashInfer's documented wrappers: BatchPrefillWithPagedKVCacheWrapper for
the prefill group (prompt chunks on top of cached prefixes) and
BatchDecodeWithPagedKVCacheWrapper for the decode group. The pool's per-layer K and V
tensors, shaped [slots, kv_heads, head_dim], are passed as a (k, v) tuple in NHD layout
with page_size 1, so no copy of the pool is ever made. Imported only when chosen.
"""

from __future__ import annotations

import torch

from radixserve.layers.attention.base import AttentionBackend, ForwardBatch

WORKSPACE_BYTES = 256 * 1024 * 1024


class FlashInferAttentionBackend(AttentionBackend):
    def __init__(self, device: str, num_heads: int) -> None:
        import flashinfer

        self.device = torch.device(device)
        self.num_heads = num_heads
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")

    @staticmethod
    def _paged(slots: list[torch.Tensor], device: torch.device):
        lens = torch.tensor([s.numel() for s in slots], dtype=torch.int32)
        indptr = torch.zeros(len(slots) + 1, dtype=torch.int32)
        indptr[1:] = torch.cumsum(lens, 0)
        indices = torch.cat(slots).to(torch.int32)
        last_page_len = torch.ones(len(slots), dtype=torch.int32)
        return indptr.to(device), indices.to(device), last_page_len.to(device)

    def init_forward(self, batch: ForwardBatch) -> None:
        pool = batch.kv_pool
        np_ = batch.num_prefill_reqs
        heads = (self.num_heads, pool.num_kv_heads, pool.head_dim)
        if np_:
            ext = torch.tensor(batch.extend_lens[:np_], dtype=torch.int32)
            qo_indptr = torch.zeros(np_ + 1, dtype=torch.int32)
            qo_indptr[1:] = torch.cumsum(ext, 0)
            indptr, indices, last = self._paged(batch.req_slots[:np_], self.device)
            self.prefill.plan(
                qo_indptr.to(self.device),
                indptr,
                indices,
                last,
                *heads,
                1,
                causal=True,
                q_data_type=pool.dtype,
                kv_data_type=pool.dtype,
            )
        if batch.batch_size > np_:
            indptr, indices, last = self._paged(batch.req_slots[np_:], self.device)
            self.decode.plan(
                indptr,
                indices,
                last,
                *heads,
                1,
                q_data_type=pool.dtype,
                kv_data_type=pool.dtype,
            )

    def forward(self, q, k, v, layer_id, batch, scale):
        pool = batch.kv_pool
        pool.set_kv(layer_id, batch.out_cache_loc, k, v)
        # page_size 1: view [slots, kv_heads, dim] as [pages, 1, kv_heads, dim]
        kv = (pool.k_buffer[layer_id].unsqueeze(1), pool.v_buffer[layer_id].unsqueeze(1))
        npt = batch.num_prefill_tokens
        outs = []
        if batch.num_prefill_reqs:
            outs.append(self.prefill.run(q[:npt].contiguous(), kv, sm_scale=scale))
        if batch.batch_size > batch.num_prefill_reqs:
            outs.append(self.decode.run(q[npt:].contiguous(), kv, sm_scale=scale))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 0)
