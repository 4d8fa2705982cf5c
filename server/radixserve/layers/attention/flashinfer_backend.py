"""Paged attention with FlashInfer on CUDA (page size 1: a slot is a page).

Written against FlashInfer's documented wrappers. Prefill (prompt chunks on top of cached
prefixes) runs BatchPrefillWithPagedKVCacheWrapper with `causal=True`, whose mask FlashInfer
aligns to the end of each request's KV (query i of a chunk of q tokens over kv keys sees
keys 0 .. kv - q + i), so one call covers a cached prefix and the chunk's own tokens; decode
runs BatchDecodeWithPagedKVCacheWrapper. The K/V of the step is written into the pool
first, so both kernels read every key from the pool: the pool's per-layer tensors,
[slots, kv_heads, head_dim], are passed as a (k, v) tuple viewed as [pages, 1, kv_heads,
head_dim] (NHD, page size 1: every last_page_len is 1), and no copy of the pool is made.

`plan` runs once per step on the host (its indptr/last-page-len arguments are CPU tensors,
so planning needs no device sync); `run` runs once per layer. For CUDA graphs the decode
path has one wrapper per captured batch size, built in CUDA-graph mode over buffers that
stay put: the graph records kernels reading those buffers, and each replay first re-plans
the wrapper, which rewrites them in place (FlashInfer fixes the kernel's grid per batch size
in this mode, so a plan at capture and one at replay launch the same kernels). The
checks of this contract on the CPU, against a stand-in that keeps it, are in
tests/server/test_gpu_paths.py. Imported only when chosen.
"""

from __future__ import annotations

import torch

from radixserve.layers.attention.base import AttentionBackend, ForwardBatch

WORKSPACE_BYTES = 256 * 1024 * 1024
# FlashInfer's tensor-core decode pays off once several query heads share a KV head (SGLang's
# rule too); its CUDA-core decode kernel is built only for groups of 1, 2, 3, 4, 6, 8 and 16,
# so uneven tensor-parallel head splits (groups of 5, 7, ...) must take tensor cores anyway.
TENSOR_CORE_MIN_GROUP = 4
# FlashInfer's FA2 prefill kernels are the same compiled module as its tensor-core decode
# (one JIT build per dtype and head size instead of two, the FA3 one being the slow one to
# compile); "auto" would take FA3 on Hopper.
PREFILL_KERNELS = "fa2"


class FlashInferAttentionBackend(AttentionBackend):
    def __init__(self, device: str, num_heads: int) -> None:
        import flashinfer

        self.flashinfer = flashinfer
        self.device = torch.device(device)
        self.num_heads = num_heads
        # FlashInfer asks for a zeroed workspace on first use
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend=PREFILL_KERNELS
        )
        self.decode = None  # built on the first step, once the GQA group size is known
        self.graph_decode: dict[int, object] = {}  # batch size -> CUDA-graph-mode wrapper
        self.graph_buffers: dict[str, torch.Tensor] = {}
        self.active_decode = None  # the decode wrapper this step's `forward` runs

    def _tensor_cores(self, num_kv_heads: int) -> bool:
        return self.num_heads // num_kv_heads >= TENSOR_CORE_MIN_GROUP

    @staticmethod
    def _page_table(slots: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indptr, indices, last_page_len); indptr and last_page_len stay on the CPU, as
        `plan` reads them there."""
        lens = torch.tensor([s.numel() for s in slots], dtype=torch.int32)
        indptr = torch.zeros(len(slots) + 1, dtype=torch.int32)
        indptr[1:] = torch.cumsum(lens, 0)
        indices = torch.cat(slots).to(torch.int32)
        return indptr, indices, torch.ones(len(slots), dtype=torch.int32)

    def _plan_kwargs(self, pool) -> dict:
        # FlashInfer fixes the softmax scale at plan time; our models all use head_dim**-0.5
        return {
            "q_data_type": pool.dtype,
            "kv_data_type": pool.dtype,
            "sm_scale": pool.head_dim**-0.5,
        }

    def init_forward(self, batch: ForwardBatch) -> None:
        pool = batch.kv_pool
        np_ = batch.num_prefill_reqs
        heads = (self.num_heads, pool.num_kv_heads, pool.head_dim, 1)
        if np_:
            ext = torch.tensor(batch.extend_lens[:np_], dtype=torch.int32)
            qo_indptr = torch.zeros(np_ + 1, dtype=torch.int32)
            qo_indptr[1:] = torch.cumsum(ext, 0)
            indptr, indices, last = self._page_table(batch.req_slots[:np_])
            self.prefill.plan(
                qo_indptr,
                indptr,
                indices.to(self.device, non_blocking=True),
                last,
                *heads,
                causal=True,
                **self._plan_kwargs(pool),
            )
        if batch.batch_size == np_:
            return
        graph_bs = batch.metadata.get("cuda_graph_bs")
        if graph_bs is not None:
            self.active_decode = self.graph_decode[graph_bs]
        else:
            if self.decode is None:
                self.decode = self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    self.workspace, "NHD", use_tensor_cores=self._tensor_cores(pool.num_kv_heads)
                )
            self.active_decode = self.decode
        indptr, indices, last = self._page_table(batch.req_slots[np_:])
        indices = indices.to(self.device, non_blocking=True)
        self.active_decode.plan(indptr, indices, last, *heads, **self._plan_kwargs(pool))

    def init_cuda_graphs(self, batch_sizes: list[int], max_indices: int, num_kv_heads: int):
        """Decode wrappers for CUDA graphs, one per batch size, sharing fixed buffers (only
        one graph runs at a time); `max_indices` bounds the slots of one batch's requests."""
        max_bs = max(batch_sizes)
        buf = {
            "indptr": torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device),
            "indices": torch.zeros(max_indices, dtype=torch.int32, device=self.device),
            "last_page_len": torch.ones(max_bs, dtype=torch.int32, device=self.device),
        }
        self.graph_buffers = buf
        for bs in batch_sizes:
            self.graph_decode[bs] = self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace,
                "NHD",
                use_cuda_graph=True,
                use_tensor_cores=self._tensor_cores(num_kv_heads),
                paged_kv_indptr_buffer=buf["indptr"][: bs + 1],
                paged_kv_indices_buffer=buf["indices"],
                paged_kv_last_page_len_buffer=buf["last_page_len"][:bs],
            )

    def forward(self, q, k, v, layer_id, batch, scale):
        pool = batch.kv_pool
        pool.set_kv(layer_id, batch.out_cache_loc, k, v)
        kv = (pool.k_buffer[layer_id].unsqueeze(1), pool.v_buffer[layer_id].unsqueeze(1))
        npt = batch.num_prefill_tokens
        outs = []
        if batch.num_prefill_reqs:
            outs.append(self.prefill.run(q[:npt].contiguous(), kv))
        if batch.batch_size > batch.num_prefill_reqs:
            outs.append(self.active_decode.run(q[npt:].contiguous(), kv))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 0)
