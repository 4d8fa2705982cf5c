"""LoRA decode steps in the int4 path's one-call step (layers/cpu_decode.py, the LoRA part of
csrc/cpu_kernels.c): a batch of several adapters and base rows comes out close to the
layer-by-layer LoRA path with the same greedy tokens, base rows are untouched by the
adapters of other rows, and adapters loaded and unloaded at run time are what the next
step reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from radixserve.bench.lora_adapters import write_random_adapter
from radixserve.config import ServerArgs
from radixserve.engine.model_runner import ModelRunner
from radixserve.layers import cpu_decode, cpu_kernels
from radixserve.layers.attention import ForwardBatch
from test_cpu_decode import assert_declined
from test_cpu_decode import decode_batch as base_decode_batch

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available()[0],
    reason=f"radixserve's CPU kernels are not here: {cpu_kernels.available()[1]}",
)

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# name: (rank, lora_alpha, target modules); ranks below the slots' 16 and parts left out
# (their slots' rows stay zero) exercise the kernel's per-adapter rank and the fused parts
ADAPTERS = {
    "all16": (16, 16, ALL),
    "qv8": (8, 16, ("q_proj", "v_proj")),
    "mlp4": (4, 8, ("gate_proj", "down_proj", "o_proj")),
    "other16": (16, 32, ("k_proj", "up_proj", "q_proj", "down_proj")),  # loaded later
}
CONTEXT = 24
# the random K/V histories' scale: at test_cpu_decode.py's 1.0 the attention of some rows is
# so peaked that the two paths' last-bit differences pick other keys and move a bfloat16 row
# (a base row too) to cosine ~0.94 after 30 layers; at 0.1 rows stay above ~0.995
KV_SCALE = 0.1


def write_adapter(folder: Path, config, rank: int, alpha: int, modules, seed: int) -> None:
    """Random A and B (as bench/lora.py writes them) large enough that the adapter moves
    the hidden states far more than the two paths' rounding does."""
    write_random_adapter(folder, config, rank, seed, alpha=alpha, modules=modules, scale=0.04)


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def runner(request, tmp_path_factory) -> ModelRunner:
    dtype = "float32" if request.param == torch.float32 else "bfloat16"
    r = ModelRunner(
        ServerArgs(
            device="cpu", dtype=dtype, quantization="int4", enable_lora=True,
            max_loras=3, max_lora_rank=16, max_total_tokens=2048,
        )
    )  # fmt: skip
    assert r.model.fused_decode is not None, cpu_decode.why_not(r.model)
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, (rank, alpha, modules)) in enumerate(ADAPTERS.items()):
        write_adapter(root / name, r.config, rank, alpha, modules, seed)
        r.lora.load(name, str(root / name), str(root / name))
    return r


def decode_batch(runner: ModelRunner, slots: list[torch.Tensor], adapters: list[int], seed: int):
    """One decode token per request (adapter slot per request, -1: base) over random K/V
    histories at KV_SCALE."""
    return base_decode_batch(runner, slots, seed, kv_scale=KV_SCALE, adapters=adapters)


@torch.inference_mode()
def hidden(runner: ModelRunner, batch: ForwardBatch, fused: bool) -> torch.Tensor:
    """The final hidden states by either path, the step planned as ModelRunner._forward
    plans it (its LoRA plan for the batch's current adapter slots)."""
    keep = runner.model.fused_decode
    runner.model.fused_decode = keep if fused else None
    try:
        batch.metadata.clear()
        runner.backend.init_forward(batch)
        batch.metadata["lora"] = runner.lora.batch_plan(
            batch.lora_slots, batch.extend_lens, runner.device
        )
        if fused:  # the step is the one-call step's, not a fallback to the layers
            x = runner.model.embed_tokens(batch.input_ids).float()
            out = keep.run(x, batch)
            assert out is not None
            return out
        return runner.model(batch)
    finally:
        runner.model.fused_decode = keep


def part(batch: ForwardBatch, rows: slice) -> ForwardBatch:
    """Some of a decode batch's requests as a batch of their own."""
    return ForwardBatch(
        input_ids=batch.input_ids[rows], positions=batch.positions[rows],
        out_cache_loc=batch.out_cache_loc[rows], kv_pool=batch.kv_pool, num_prefill_reqs=0,
        num_prefill_tokens=0, prefix_lens=batch.prefix_lens[rows],
        extend_lens=batch.extend_lens[rows], req_slots=batch.req_slots[rows],
        lora_slots=batch.lora_slots[rows],
    )  # fmt: skip


def reference(runner: ModelRunner, batch: ForwardBatch) -> torch.Tensor:
    """The layer-by-layer LoRA path, 6 requests at a time: there its matmuls are the int4
    kernel's, as in the one-call step (above 8 rows they are dense bfloat16 matmuls, which
    random K/V histories amplify over 30 layers into other greedy tokens than the int4
    kernel's even without adapters)."""
    n = batch.batch_size
    return torch.cat([hidden(runner, part(batch, slice(i, i + 6)), False) for i in range(0, n, 6)])


def close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """As test_cpu_decode.py's batch comparison: the paths sum in other orders and round
    the LoRA delta at other points, which random K/V histories amplify over 30 layers;
    the same greedy tokens. bfloat16 gets more room: where the CPU lacks it natively (an
    AVX2 machine) torch's emulated bfloat16 matmuls in the reference round differently
    again (a base row at cosine 0.988 seen there)."""
    least = 0.999 if ours.dtype == torch.float32 else 0.98
    assert torch.nn.functional.cosine_similarity(ours.float(), ref.float()).min() > least


def greedy(runner: ModelRunner, h: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return runner.model.compute_logits(h).argmax(-1)


def test_mixed_batch_matches_the_layer_by_layer_lora_path(runner):
    names = ["all16", "qv8", "mlp4"]
    slot = {n: runner.lora.acquire(n) for n in names}
    a, b, c = (slot[n] for n in names)
    adapters = [a, b, -1, c, a, -1, b, c, a, -1, b, a]
    block = runner.pool.alloc(len(adapters) * CONTEXT)
    slots = [block[i :: len(adapters)][: 10 + i] for i in range(len(adapters))]
    try:
        batch = decode_batch(runner, slots, adapters, seed=1)
        ours = hidden(runner, batch, fused=True)
        ref = reference(runner, batch)
        close(ours, ref)
        assert torch.equal(greedy(runner, ours), greedy(runner, ref))
        if runner.dtype == torch.float32:  # and the whole batch at once, its dense matmuls
            whole = hidden(runner, batch, fused=False)
            close(ours, whole)
            assert torch.equal(greedy(runner, ours), greedy(runner, whole))
        # the adapters move their rows much further than the paths differ: the comparison
        # above would catch a missing or misplaced delta
        batch.lora_slots = [-1] * len(adapters)
        base = hidden(runner, batch, fused=True)
        moved = (ours - base).abs().amax(-1)
        gap = (ours - ref).abs().amax(-1)
        lora_rows = torch.tensor([s >= 0 for s in adapters])
        assert (moved > 4 * gap)[lora_rows].all()
        assert (greedy(runner, ours) != greedy(runner, base)).any()
        # base rows: bit for bit what they are in a batch without adapters
        assert torch.equal(ours[~lora_rows], base[~lora_rows])
    finally:
        runner.pool.free(block)
        for n in names:
            runner.lora.release(n)


def test_a_base_row_is_unchanged_by_adapters_on_other_rows(runner):
    slot = runner.lora.acquire("all16")
    block = runner.pool.alloc(9 * 16)
    slots = [block[i::9][:16] for i in range(9)]
    try:
        batch = decode_batch(runner, slots, [slot] * 4 + [-1] + [slot] * 4, seed=2)
        mixed = hidden(runner, batch, fused=True)
        one = ForwardBatch(
            input_ids=batch.input_ids[4:5], positions=batch.positions[4:5],
            out_cache_loc=batch.out_cache_loc[4:5], kv_pool=runner.pool, num_prefill_reqs=0,
            num_prefill_tokens=0, prefix_lens=[15], extend_lens=[1], req_slots=[slots[4]],
        )  # fmt: skip
        with torch.inference_mode():
            runner.backend.init_forward(one)
            alone = runner.model(one)
        assert torch.equal(mixed[4], alone[0])
        batch.lora_slots = [-1] * 9  # and the adapter rows are not the base model's
        assert not torch.equal(mixed[3], hidden(runner, batch, fused=True)[3])
    finally:
        runner.pool.free(block)
        runner.lora.release("all16")


def test_an_adapter_swapped_at_run_time_is_seen_by_the_next_step(runner):
    """Unloading an adapter clears its slot in place and loading another writes the same
    slot: the one-call step reads the new weights and rank (pointers gathered once)."""
    lm = runner.lora
    # the other two pinned first (earlier tests leave any residents, in any slots): the slot
    # mlp4 frees is then the only one the next adapter can take
    pinned = [lm.acquire(n) for n in ("all16", "qv8")]
    slot = lm.acquire("mlp4")
    assert slot not in pinned
    block = runner.pool.alloc(10 * 12)
    slots = [block[i::10][:12] for i in range(10)]
    try:
        batch = decode_batch(runner, slots, [slot, -1] * 5, seed=3)
        before = hidden(runner, batch, fused=True)
        lm.release("mlp4")
        folder = lm.adapters["mlp4"].source
        assert lm.try_unload("mlp4")
        assert lm.acquire("other16") == slot
        after = hidden(runner, batch, fused=True)
        close(after, reference(runner, batch))
        assert (after[0::2] - before[0::2]).abs().max() > 1.0
        assert torch.equal(after[1::2], before[1::2])
        # and back: the first adapter's rows again
        lm.release("other16")
        assert lm.try_unload("other16")
        lm.load("mlp4", folder, folder)
        assert lm.acquire("mlp4") == slot
        assert torch.equal(hidden(runner, batch, fused=True), before)
    finally:
        runner.pool.free(block)
        for name in list(lm.pins):
            lm.pins[name] = 0


def test_adapter_slots_the_kernel_does_not_take_are_left_to_the_layers(runner, monkeypatch):
    slot = runner.lora.acquire("all16")
    slots = [runner.pool.alloc(4) for _ in range(3)]
    try:
        batch = decode_batch(runner, slots, [slot, -1, slot], seed=4)
        batch.metadata["lora"] = runner.lora.batch_plan(batch.lora_slots, [1] * 3, "cpu")
        monkeypatch.setattr(cpu_decode, "LORA_MAX_PARTS", 2)  # qkv_proj has three
        fused = cpu_decode.FusedDecode(runner.model)  # reads the slots under the lower limit
        assert_declined(fused, runner, batch)
    finally:
        for s in slots:
            runner.pool.free(s)
        runner.lora.release("all16")
