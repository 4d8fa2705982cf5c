"""Multi-LoRA on CUDA: three adapters and the base model in one batch, through the real
scheduler, on a small random Qwen3 (Llama family; head size 128, GQA group of 4 as in
Llama-3-8B, so FlashInfer builds the kernels the GPU benchmark's server then reuses).

Marked `gpu` (skipped without CUDA, and without flashinfer where they need it):

- float32, torch attention (FlashInfer has no float32 kernels): every prompt's greedy
  tokens equal PEFT's (the transformers model with the same adapters on CUDA), except at a
  near tie (PEFT's best two within FLOAT32_TIE nats).
- float16, FlashInfer and decode CUDA graphs: the tokens of the float16 torch backend,
  parting only at a near tie as in test_gpu_paths.py; decode steps with adapters replay
  the graphs (captured with the adapters' fixed-shape form, layers/lora.py's LoraRows).

On any machine (in `make test`): the FlashInfer backend and CUDA-graph runner on
test_gpu_paths.py's CPU stand-ins, with the adapters, give the torch backend's tokens in
float32, decode steps with adapters among those that replay graphs.

The adapters (radixserve.bench.lora_adapters): ranks 8 and 16, different target modules,
A and B large enough that each adapter's tokens differ from the others' and the base's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft_reference import load_peft, peft_greedy
from radixserve.bench.lora_adapters import MODULES, write_random_adapter
from radixserve.config import ServerArgs
from radixserve.engine.cuda_graph_runner import CudaGraphRunner
from radixserve.engine.lora import LoraManager
from radixserve.engine.model_runner import ModelRunner
from test_gpu_paths import (  # noqa: F401 (fake_flashinfer: a fixture)
    assert_same_greedy,
    fake_cuda_graphs,
    fake_flashinfer,
    free_gpu_memory,
    generate,
    gpu,
    needs_cuda,
    needs_flashinfer,
    tiny_model,
)

FLOAT32_TIE = 0.01  # nats: float32 kernels of two libraries differ by far less
ADAPTERS = {
    "qv8": dict(rank=8, alpha=16, modules=("q_proj", "v_proj")),
    "all16": dict(rank=16, alpha=16, modules=MODULES),
    "mlp8": dict(rank=8, alpha=8, modules=("k_proj", "o_proj", "gate_proj", "down_proj")),
}
ADAPTER_SCALE = 0.1  # A and B ~ N(0, 0.1^2): deltas comparable to the base projections'
# one prompt fills the radix cache under qv8; then together: the same prefix under qv8
# (cached) and under all16 (not: another adapter's KV), a prompt prefilled in three chunks,
# short ones, and two base-model prompts with the longest outputs, so that the last decode
# steps are the base model's alone
PREFIX = list(range(1, 100))
WAVES = [
    [PREFIX + [300, 301]],
    [
        PREFIX + [302] * 3,
        PREFIX + [303, 304],
        [(7 * i) % 500 + 1 for i in range(150)],
        [5, 6, 7],
        list(range(20, 90)),
        list(range(90, 100)),
        list(range(200, 240)),
        [11, 12, 13, 14],
    ],
]
LORAS = ["qv8", "qv8", "all16", "mlp8", None, "all16", "mlp8", None, "qv8"]
MAX_NEW = [8, 24, 20, 18, 28, 16, 20, 36, 18]


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """(the model's folder, {adapter: folder})."""
    from transformers import AutoConfig

    model = tiny_model(
        str(tmp_path_factory.mktemp("lora-gqa4")), heads=8, kv_heads=2, head_dim=128, layers=4
    )
    config = AutoConfig.from_pretrained(model)
    root = tmp_path_factory.mktemp("lora-adapters")
    folders = {}
    for seed, (name, kw) in enumerate(ADAPTERS.items()):
        write_random_adapter(Path(root, name), config, seed=seed, scale=ADAPTER_SCALE, **kw)
        folders[name] = str(root / name)
    return model, folders


def lora_args(model: str, folders: dict[str, str], device: str = "cuda", **kw) -> ServerArgs:
    kw.setdefault("dtype", "float16")
    return ServerArgs(
        model_path=model,
        device=device,
        max_total_tokens=8192,
        chunked_prefill_size=64,
        cuda_graph_max_bs=4,
        lora_paths=[f"{name}={folder}" for name, folder in folders.items()],
        max_loras=len(folders),
        max_lora_rank=16,
        **kw,
    )


def lora_generate(args: ServerArgs, *, top2: bool = False):
    try:
        return generate(args, WAVES, MAX_NEW, top2=top2, loras=LORAS)
    finally:
        if args.device.startswith("cuda"):
            free_gpu_memory()


def peft_reference(model: str, folders: dict[str, str], device: str):
    """PEFT's float32 greedy tokens and top two per prompt, and whether the adapters change
    the output: one prompt's tokens under each adapter and the base."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(device)
    peft = load_peft(base, folders)
    prompts = [p for wave in WAVES for p in wave]
    ref = [
        peft_greedy(peft, lora, ids, n, top2=True)
        for ids, lora, n in zip(prompts, LORAS, MAX_NEW, strict=True)
    ]
    variants = {tuple(peft_greedy(peft, name, [5, 6, 7], 12)) for name in [*folders, None]}
    del peft, base
    return [t for t, _ in ref], [p for _, p in ref], len(variants)


def check_float32_equals_peft(model: str, folders: dict[str, str], device: str, monkeypatch):
    """The float32 comparison, on `device` (also runnable on the CPU by hand)."""
    want, want_top2, variants = peft_reference(model, folders, device)
    assert variants == len(folders) + 1, "the adapters do not change the tokens: raise the scale"
    steps: list[set[int]] = []
    real_plan = LoraManager.batch_plan

    def spy(self, lora_slots, extend_lens, dev):
        steps.append(set(lora_slots))
        return real_plan(self, lora_slots, extend_lens, dev)

    monkeypatch.setattr(LoraManager, "batch_plan", spy)
    args = lora_args(model, folders, device, dtype="float32", attention_backend="torch")
    got = lora_generate(args)
    # a step ran all three adapters and the base model together
    assert any(len(s) == len(folders) + 1 and -1 in s for s in steps), steps
    assert_same_greedy(want, want_top2, got, "radixserve vs PEFT, float32", near_tie=FLOAT32_TIE)


@gpu
@needs_cuda
def test_three_adapters_and_the_base_in_one_batch_match_peft_on_cuda(lora_model, monkeypatch):
    model, folders = lora_model
    check_float32_equals_peft(model, folders, "cuda", monkeypatch)


@gpu
@needs_cuda
@needs_flashinfer
def test_lora_on_flashinfer_with_cuda_graphs_gives_torch_backend_tokens(lora_model, monkeypatch):
    model, folders = lora_model
    reference, top2 = lora_generate(
        lora_args(model, folders, attention_backend="torch", disable_cuda_graph=True), top2=True
    )
    replayed = spy_replays(monkeypatch)
    got = lora_generate(lora_args(model, folders, attention_backend="flashinfer"))
    assert any(replayed), "no decode step with an adapter replayed a graph"
    assert_same_greedy(reference, top2, got, "LoRA: flashinfer + graphs vs torch, float16")


def spy_replays(monkeypatch) -> list[bool]:
    """Per decode step that replayed a graph, whether it used an adapter."""
    replayed: list[bool] = []
    real_replay = CudaGraphRunner.replay

    def spy(self, batch):
        replayed.append(any(s >= 0 for s in batch.lora_slots or ()))
        return real_replay(self, batch)

    monkeypatch.setattr(CudaGraphRunner, "replay", spy)
    return replayed


def test_lora_with_flashinfer_and_cuda_graphs_on_the_cpu_stand_ins(
    lora_model,
    fake_flashinfer,  # noqa: F811 (the fixture imported above)
    monkeypatch,
):
    model, folders = lora_model
    common = dict(device="cpu", dtype="float32")
    reference = lora_generate(
        lora_args(model, folders, attention_backend="torch", disable_cuda_graph=True, **common)
    )
    real_init = ModelRunner.__init__

    def init_with_graphs(self, *a, **k):
        real_init(self, *a, **k)
        self.cuda_graphs = CudaGraphRunner(self)  # on CUDA, ModelRunner does this itself

    monkeypatch.setattr(ModelRunner, "__init__", init_with_graphs)
    replayed = spy_replays(monkeypatch)
    with fake_cuda_graphs(monkeypatch, fake_flashinfer):
        got = lora_generate(lora_args(model, folders, attention_backend="flashinfer", **common))
    assert got == reference
    assert any(replayed), "no decode step with an adapter replayed a graph"
