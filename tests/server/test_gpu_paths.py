"""The CUDA fast path gives the tokens of the plain path: FlashInfer attention against the
torch backend, decode CUDA graphs against eager decode, NCCL tensor parallelism against one
GPU. Skipped without CUDA (and the FlashInfer ones without flashinfer installed)."""

from __future__ import annotations

import pytest
import torch
from radixserve.config import ServerArgs
from radixserve.engine.engine_process import eos_token_ids
from radixserve.engine.io_struct import TokenizedGenerateReq
from radixserve.engine.model_runner import ModelRunner
from radixserve.engine.sampling_params import SamplingParams
from radixserve.engine.scheduler import Scheduler
from radixserve.models.loader import load_tokenizer, resolve_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Who wrote Hamlet?",
    "Explain photosynthesis in one sentence.",
]
NEW_TOKENS = 24


def prompts() -> list[list[int]]:
    tok = load_tokenizer(resolve_model(None))
    out = []
    for q in QUESTIONS:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
        )
        out.append(list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids))
    return out


def greedy(**overrides) -> list[list[int]]:
    """All prompts at once through the scheduler: prefill, then batched decode steps (5
    requests: the CUDA-graph runs pad them to the graph of size 8)."""
    args = ServerArgs(device="cuda", max_total_tokens=8192, **overrides)
    runner = ModelRunner(args)
    tok = load_tokenizer(runner.source)
    sched = Scheduler(args, runner, tok, eos_token_ids(runner.config, tok, runner.source.folder))
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    ps = prompts()
    for i, ids in enumerate(ps):
        sched.add_request(TokenizedGenerateReq(f"r{i}", ids, params))
    out: dict[str, list[int]] = {}
    while sched.has_work():
        for o in sched.step():
            out.setdefault(o.rid, []).extend(o.new_token_ids)
    del runner, sched
    torch.cuda.empty_cache()
    return [out[f"r{i}"] for i in range(len(ps))]


def test_auto_picks_flashinfer_and_bfloat16_on_gpu():
    pytest.importorskip("flashinfer")
    runner = ModelRunner(ServerArgs(device="cuda", max_total_tokens=1024, disable_cuda_graph=True))
    assert runner.backend_name == "flashinfer"
    assert runner.dtype == torch.bfloat16


def test_flashinfer_greedy_tokens_equal_torch_backend():
    pytest.importorskip("flashinfer")
    common = dict(dtype="float16", disable_cuda_graph=True)
    reference = greedy(attention_backend="torch", **common)
    assert greedy(attention_backend="flashinfer", **common) == reference


def test_cuda_graph_decode_equals_eager_decode():
    pytest.importorskip("flashinfer")
    common = dict(dtype="float16", attention_backend="flashinfer")
    eager = greedy(disable_cuda_graph=True, **common)
    assert greedy(cuda_graph_max_bs=8, **common) == eager


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tp2_nccl_equals_one_gpu():
    from radixserve.engine.engine import Engine

    common = dict(dtype="float32", attention_backend="torch", disable_cuda_graph=True)
    reference = greedy(**common)
    params = {"temperature": 0.0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    with Engine(None, tp_size=2, device="cuda", max_total_tokens=8192, **common) as engine:
        got = [
            r["output_ids"] for r in engine.generate(input_ids=prompts(), sampling_params=params)
        ]
    assert got == reference
