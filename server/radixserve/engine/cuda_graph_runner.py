"""CUDA graphs for decode steps: one captured graph per batch size up to --cuda-graph-max-bs.

A decode step of a small model is mostly kernel-launch overhead: hundreds of small kernels
for a handful of tokens. A graph replays the whole forward (and the LM head) as one launch.
Graphs need fixed shapes and fixed addresses, so:
- inputs live in static buffers (token ids, positions, KV slots written), sized for the
  largest batch; a batch of n runs the graph of the next captured size b >= n, and the
  b - n padding rows compute token 0 at position 0 into the scratch slot 0, which no
  request ever reads;
- attention reads its page table from buffers the backend keeps in place (FlashInfer's
  CUDA-graph mode); the backend re-plans them on the host before each replay, never
  during a capture (FlashInfer's plan cannot be captured);
- the logits come back in the graph's own output tensor, valid until the next replay
  (the scheduler samples from them before it runs another step).
With --enable-lora the graphs are captured with the adapters' fixed-shape form
(layers/lora.py's LoraRows: per-row slot indices and a mask in static buffers), so decode
steps with any mix of adapters and the base replay them too.
Prefill and mixed steps, and decode batches above the bound, run eagerly. Under tensor
parallelism every rank captures the same sizes in the same order and replays the same one
each step, so the NCCL all-reduces recorded in the graphs line up.
"""

from __future__ import annotations

import logging

import torch

from radixserve.layers.attention import ForwardBatch
from radixserve.layers.lora import LoraRows

logger = logging.getLogger(__name__)


def capture_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_bs (and max_bs itself): little padding waste for
    small batches, few graphs for large ones."""
    sizes = {bs for bs in (1, 2, 4, 8) if bs <= max_bs}
    sizes |= set(range(16, max_bs + 1, 16))
    sizes.add(max_bs)
    return sorted(sizes)


class CudaGraphRunner:
    def __init__(self, runner) -> None:
        self.runner = runner
        self.model = runner.model
        self.backend = runner.backend
        self.pool = runner.pool
        args = runner.args
        self.max_bs = min(args.cuda_graph_max_bs, args.max_running_requests)
        self.batch_sizes = capture_batch_sizes(self.max_bs)
        device = runner.device
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(self.max_bs, dtype=torch.int64, device=device)
        self.out_cache_loc = torch.zeros(self.max_bs, dtype=torch.int64, device=device)
        self.scratch = torch.zeros(1, dtype=torch.int64)  # a padding row's one slot
        # with adapters: each row's slot and mask, in place for every captured size
        self.lora: dict[int, LoraRows] = {}
        if getattr(runner, "lora", None) is not None:
            slot = torch.zeros(self.max_bs, dtype=torch.int64, device=device)
            mask = torch.zeros(self.max_bs, dtype=runner.dtype, device=device)
            self.lora = {bs: LoraRows(slot[:bs], mask[:bs]) for bs in self.batch_sizes}
        # the slots one batch's page table can list: requests sharing a cached prefix list
        # the same slots, so bound it by the requests' longest possible sequences
        max_indices = self.max_bs * runner.context_length
        self.backend.init_cuda_graphs(self.batch_sizes, max_indices, runner.num_kv_heads)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.mempool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            # largest first: the smaller graphs then fit in the memory the larger one freed
            for bs in reversed(self.batch_sizes):
                self._capture(bs)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.batch_sizes)

    def can_run(self, batch: ForwardBatch) -> bool:
        # graphs captured without adapters (no --enable-lora) leave a step with one eager
        return (
            batch.num_prefill_reqs == 0
            and batch.batch_size <= self.max_bs
            and (bool(self.lora) or not any(s >= 0 for s in batch.lora_slots or ()))
        )

    def _batch(self, bs: int, prefix_lens: list[int], req_slots: list[torch.Tensor]):
        return ForwardBatch(
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            kv_pool=self.pool,
            num_prefill_reqs=0,
            num_prefill_tokens=0,
            prefix_lens=prefix_lens,
            extend_lens=[1] * bs,
            req_slots=req_slots,
            metadata={"cuda_graph_bs": bs, **({"lora": self.lora[bs]} if self.lora else {})},
        )

    def _run(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model.compute_logits(self.model(batch))

    def _capture(self, bs: int) -> None:
        batch = self._batch(bs, [0] * bs, [self.scratch] * bs)
        self.backend.init_forward(batch)
        # warm up on a side stream first: lazy initialisation (cuBLAS workspaces, kernel
        # loading) must not happen inside the capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._run(batch)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            self.logits[bs] = self._run(batch)
        self.graphs[bs] = graph

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits of a decode batch (one row per request), from the graph of its size."""
        n = batch.batch_size
        bs = next(b for b in self.batch_sizes if b >= n)
        for buf, src in (
            (self.input_ids, batch.input_ids),
            (self.positions, batch.positions),
            (self.out_cache_loc, batch.out_cache_loc),
        ):
            buf[:n].copy_(src, non_blocking=True)
            # rows left from a larger batch hold live requests' slots: padding writes slot 0
            buf[n:bs].zero_()
        pad = bs - n
        if self.lora:
            self.lora[bs].fill(batch.lora_slots)
        graph_batch = self._batch(
            bs, batch.prefix_lens + [0] * pad, batch.req_slots + [self.scratch] * pad
        )
        # host-side plan into the graph's buffers: safe because sampling the previous step
        # waited for its GPU work (overlapping CPU and GPU would have to wait here instead)
        self.backend.init_forward(graph_batch)
        self.graphs[bs].replay()
        return self.logits[bs][:n]
