"""Our model against transformers' reference: logits within tolerance, greedy tokens equal.

Tiny random Llama (with llama3 RoPE scaling), Qwen2 (QKV bias) and Qwen3 (QK norm) configs
are saved as safetensors folders and loaded through our loader; the default model is the
GGUF that transformers also reads. Float32 everywhere, so differences are rounding only.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from radixserve.config import ServerArgs
from radixserve.engine.io_struct import TokenizedGenerateReq
from radixserve.engine.model_runner import ModelRunner
from radixserve.engine.sampling_params import SamplingParams
from radixserve.engine.scheduler import Scheduler
from radixserve.layers.attention import ForwardBatch
from radixserve.models.loader import default_model_path, resolve_model
from transformers import AutoConfig, AutoModelForCausalLM

LOGIT_ATOL = 2e-4  # float32; observed max differences are around 1e-5

TINY = {
    "llama": dict(
        model_type="llama",
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        tie_word_embeddings=False,
    ),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", head_dim=32, tie_word_embeddings=False),
}


def tiny_model_dir(tmp_path_factory, kind: str) -> str:
    extra = dict(TINY[kind])
    model_type = extra.pop("model_type")
    cfg = AutoConfig.for_model(
        model_type,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=256,
        **extra,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb them
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp(kind)
    model.save_pretrained(path)
    return str(path)


def prefill_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    slots = runner.pool.alloc(len(ids))
    batch = ForwardBatch(
        input_ids=torch.tensor(ids),
        positions=torch.arange(len(ids)),
        out_cache_loc=slots,
        kv_pool=runner.pool,
        num_prefill_reqs=1,
        num_prefill_tokens=len(ids),
        prefix_lens=[0],
        extend_lens=[len(ids)],
        req_slots=[slots],
    )
    try:
        return runner.forward(batch, torch.arange(len(ids)))
    finally:
        runner.pool.free(slots)


def greedy(runner: ModelRunner, ids: list[int], n: int) -> list[int]:
    eos = runner.config.eos_token_id
    sched = Scheduler(runner.args, runner, tokenizer=None, eos_ids=[eos] if eos is not None else [])
    # min_new_tokens masks eos as transformers' min_new_tokens does
    params = SamplingParams(max_new_tokens=n, min_new_tokens=n, temperature=0)
    sched.add_request(TokenizedGenerateReq("r", ids, params))
    out: list[int] = []
    while sched.has_work():
        for o in sched.step():
            out += o.new_token_ids
    return out


def reference(path: str, gguf: str | None = None):
    kw = {"gguf_file": gguf} if gguf else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def check(runner: ModelRunner, ref, ids: list[int]) -> None:
    ours = prefill_logits(runner, ids)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].float()
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff < LOGIT_ATOL, f"max logit difference {diff}"
    want = ref.generate(
        torch.tensor([ids]), max_new_tokens=64, do_sample=False, min_new_tokens=64, pad_token_id=0
    )[0, len(ids) :].tolist()
    assert greedy(runner, ids, 64) == want


@pytest.mark.parametrize("kind", sorted(TINY))
def test_tiny_random_models_match_transformers(tmp_path_factory, kind):
    path = tiny_model_dir(tmp_path_factory, kind)
    runner = ModelRunner(
        ServerArgs(model_path=path, dtype="float32", device="cpu", max_total_tokens=1024)
    )
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    check(runner, reference(path), ids)


def test_default_model_matches_transformers():
    runner = ModelRunner(ServerArgs(dtype="float32", device="cpu", max_total_tokens=1024))
    src = resolve_model(default_model_path())
    ref = reference(src.folder, src.gguf_file)
    ids = [
        1,
        9690,
        198,
        2683,
        359,
        253,
        5356,
        5646,
        11173,
        3365,
        3717,
        314,
        1,
        4093,
        198,
        1780,
        314,
        260,
        3575,
        282,
        4649,
        47,
        2,
        198,
        1,
        520,
        9531,
        198,
    ]
    check(runner, ref, ids)


def test_gguf_header_is_parsed_once_while_loading():
    """At start-up the config, tokenizer, weights and linear type each open the GGUF; inside
    `gguf_parsed_once` they share one parsed reader per file (Gemma 3's vocabulary costs ~10 s
    of CPU per parse on a 2-core VM), and outside it every open is a fresh reader again."""
    import gguf
    from radixserve.models.loader import gguf_linear_type, gguf_parsed_once, resolve_model

    src = resolve_model(None)
    path = os.path.join(src.folder, src.gguf_file)
    real = gguf.GGUFReader
    with gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(path) is first
        with gguf_parsed_once():  # nested blocks share the outer one's readers
            assert gguf.GGUFReader(path) is first
        assert gguf_linear_type(src) == "Q4_1"
    assert gguf.GGUFReader is real
    assert gguf.GGUFReader(path) is not first


def test_safetensors_model_loads_without_the_gguf_package(tmp_path_factory, monkeypatch):
    """The GPU image has no `gguf`: a safetensors model must load there (its first GPU run
    failed at start-up on the header-sharing block's import)."""
    from radixserve.models.loader import gguf_parsed_once

    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    path = tiny_model_dir(tmp_path_factory, "llama")
    with gguf_parsed_once():  # as the engine process and the TP workers load
        runner = ModelRunner(
            ServerArgs(model_path=path, dtype="float32", device="cpu", max_total_tokens=64)
        )
    assert runner.config.num_hidden_layers > 0


@pytest.mark.parametrize("single_tokens", [1, 0])
def test_single_stream_steps_run_on_one_thread(tmp_path_factory, monkeypatch, single_tokens):
    """The layers of a one-token decode step run on one torch thread
    (--cpu-single-thread-tokens 1, the default); a prompt keeps every thread, and the count
    is restored after each step (the LM head runs on all of them)."""
    path = tiny_model_dir(tmp_path_factory, "llama")
    runner = ModelRunner(
        ServerArgs(
            model_path=path,
            dtype="float32",
            device="cpu",
            max_total_tokens=256,
            cpu_single_thread_tokens=single_tokens,
        )
    )
    seen: list[tuple[int, int]] = []  # (tokens in the step, torch threads during it)
    model_forward = runner.model.forward

    def spy(batch):
        seen.append((batch.input_ids.numel(), torch.get_num_threads()))
        return model_forward(batch)

    monkeypatch.setattr(runner.model, "forward", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        greedy(runner, list(range(5, 25)), 3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    decode_threads = 1 if single_tokens else 2
    assert seen == [(20, 2), (1, decode_threads), (1, decode_threads)]
