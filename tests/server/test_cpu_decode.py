"""The int4 path's decode step in one call (layers/cpu_decode.py): bit for bit the
layer-by-layer step at one stream, rows of a batch independent of each other, and every step
it cannot compute left to the layers."""

from __future__ import annotations

import pytest
import torch
from radixserve.config import ServerArgs
from radixserve.engine.model_runner import ModelRunner
from radixserve.layers import cpu_decode, cpu_kernels
from radixserve.layers.attention import ForwardBatch

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available()[0],
    reason=f"radixserve's CPU kernels are not here: {cpu_kernels.available()[1]}",
)

CONTEXT = 40


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def runner(request) -> ModelRunner:
    dtype = "float32" if request.param == torch.float32 else "bfloat16"
    r = ModelRunner(
        ServerArgs(
            device="cpu", dtype=dtype, quantization="int4",
            max_total_tokens=2048,
        )
    )  # fmt: skip
    assert r.model.fused_decode is not None, cpu_decode.why_not(r.model)
    # what the start-up log and /server_info say
    assert r.cpu_path.decode_step.startswith("every layer in one call")
    return r


def decode_batch(
    runner: ModelRunner,
    slots: list[torch.Tensor],
    seed: int,
    kv_scale: float = 1.0,
    adapters: list[int] | None = None,
) -> ForwardBatch:
    """One decode token per request; each request's K/V history is filled with random
    values times `kv_scale` (the pool is shared, so a wrong slot shows up as a wrong
    answer); `adapters`: each request's LoRA slot (-1: the base model)."""
    g = torch.Generator().manual_seed(seed)
    pool = runner.pool
    for s in slots:
        for buf in (*pool.k_buffer, *pool.v_buffer):
            noise = torch.randn(buf.shape[0], s.numel() - 1, buf.shape[2], generator=g)
            buf[:, s[:-1]] = (kv_scale * noise).to(buf.dtype)
    return ForwardBatch(
        input_ids=torch.randint(0, 5000, (len(slots),), generator=g),
        positions=torch.tensor([s.numel() - 1 for s in slots]),
        out_cache_loc=torch.stack([s[-1] for s in slots]),
        kv_pool=pool,
        num_prefill_reqs=0,
        num_prefill_tokens=0,
        prefix_lens=[s.numel() - 1 for s in slots],
        extend_lens=[1] * len(slots),
        req_slots=slots,
        lora_slots=adapters,
    )


def row_alone(runner: ModelRunner, batch: ForwardBatch, i: int) -> ForwardBatch:
    """Request i of a decode batch as a batch of its own."""
    s = batch.req_slots[i]
    return ForwardBatch(
        input_ids=batch.input_ids[i : i + 1], positions=batch.positions[i : i + 1],
        out_cache_loc=batch.out_cache_loc[i : i + 1], kv_pool=runner.pool,
        num_prefill_reqs=0, num_prefill_tokens=0, prefix_lens=[s.numel() - 1],
        extend_lens=[1], req_slots=[s],
    )  # fmt: skip


@torch.inference_mode()
def hidden(runner: ModelRunner, batch: ForwardBatch, fused: bool) -> tuple[torch.Tensor, list]:
    """The final hidden states and every layer's new K/V, by either path."""
    keep = runner.model.fused_decode
    runner.model.fused_decode = keep if fused else None
    try:
        runner.backend.init_forward(batch)
        out = runner.model(batch)
    finally:
        runner.model.fused_decode = keep
    loc = batch.out_cache_loc
    kv = [
        (k[:, loc].clone(), v[:, loc].clone())
        for k, v in zip(runner.pool.k_buffer, runner.pool.v_buffer, strict=True)
    ]
    return out, kv


def test_one_stream_is_the_layer_by_layer_step_bit_for_bit(runner):
    slots = runner.pool.alloc(CONTEXT + 1)
    try:
        batch = decode_batch(runner, [slots], seed=1)
        ours, kv_ours = hidden(runner, batch, fused=True)
        ref, kv_ref = hidden(runner, batch, fused=False)
        assert torch.equal(ours, ref)
        for (k1, v1), (k2, v2) in zip(kv_ours, kv_ref, strict=True):
            assert torch.equal(k1, k2) and torch.equal(v1, v2)
        # the input changes the output: the comparison above is not of two constant results
        batch.input_ids += 1
        assert not torch.equal(hidden(runner, batch, fused=True)[0], ours)
    finally:
        runner.pool.free(slots)


def test_rows_of_a_batch_are_independent_and_read_only_their_slots(runner):
    """Three requests of different lengths whose slots interleave in the pool (no request
    is one run): each row equals that request decoded alone, and the layer-by-layer batch
    (torch's attention, rounding its probabilities to the activations' dtype) picks the same
    tokens, its hidden states close."""
    block = runner.pool.alloc(3 * 30)
    slots = [block[0::3][:30], block[1::3][:17], block[2::3][:24]]
    try:
        batch = decode_batch(runner, slots, seed=2)
        ours, _ = hidden(runner, batch, fused=True)
        for i in range(len(slots)):
            assert torch.equal(
                hidden(runner, row_alone(runner, batch, i), fused=True)[0][0], ours[i]
            )
        # the other path sums in another order, and random K/V histories amplify that over
        # 30 layers (rows differ by up to ~0.1 of ~36 here); one wrong slot of 17 in one
        # row moves it by ~18 (cosine 0.12)
        ref, _ = hidden(runner, batch, fused=False)
        assert (ours - ref).abs().max() < 1.0
        assert torch.nn.functional.cosine_similarity(ours.float(), ref.float()).min() > 0.999
        with torch.inference_mode():
            logits = runner.model.compute_logits(ours)
            ref_logits = runner.model.compute_logits(ref)
        assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))
    finally:
        runner.pool.free(block)


def test_batches_above_eight_rows_are_their_rows_alone(runner):
    """Above the 8 rows the layer-by-layer path gives its int4 kernel, the one-call step
    still computes each row as it would alone (the matmul takes rows four at a time)."""
    n = 11
    block = runner.pool.alloc(n * 9)
    slots = [block[i::n][: 5 + i % 4] for i in range(n)]
    try:
        batch = decode_batch(runner, slots, seed=7)
        ours, _ = hidden(runner, batch, fused=True)
        for i in (0, 6, 10):
            assert torch.equal(
                hidden(runner, row_alone(runner, batch, i), fused=True)[0][0], ours[i]
            )
    finally:
        runner.pool.free(block)


def assert_declined(fused: cpu_decode.FusedDecode, runner: ModelRunner, batch) -> None:
    """The one-call step returns None for this batch and leaves the hidden states alone."""
    x = torch.randn(batch.batch_size, runner.config.hidden_size)
    before = x.clone()
    assert fused.run(x, batch) is None
    assert torch.equal(x, before)


def test_steps_it_cannot_compute_are_left_to_the_layers(runner):
    fused = runner.model.fused_decode
    rows = cpu_decode.max_rows() + 1
    slots = [runner.pool.alloc(4) for _ in range(rows)]
    try:
        too_many = decode_batch(runner, slots, seed=3)
        prefill = decode_batch(runner, slots[:1], seed=4)
        prefill.num_prefill_reqs, prefill.num_prefill_tokens = 1, 1
        lora = decode_batch(runner, slots[:1], seed=5)
        lora.metadata["lora"] = object()
        for batch in (too_many, prefill, lora):
            assert_declined(fused, runner, batch)
    finally:
        for s in slots:
            runner.pool.free(s)


def test_only_the_int4_path_of_a_plain_llama_takes_it():
    exact = ModelRunner(
        ServerArgs(
            device="cpu", dtype="float32", quantization="none",
            max_total_tokens=64,
        )
    )  # fmt: skip
    assert exact.model.fused_decode is None  # the exact mode stays torch's, layer by layer
    assert exact.cpu_path.decode_step == ""
    assert "int4" in cpu_decode.why_not(exact.model)


def test_every_layers_projections_are_checked(runner):
    """One projection without the int4 copy in the last layer is enough to refuse."""
    proj = runner.model.layers[-1].mlp.gate_up_proj
    keep = proj.int4_kernel
    assert cpu_decode.why_not(runner.model) is None
    proj.int4_kernel = None
    try:
        assert "int4 copy" in cpu_decode.why_not(runner.model)
    finally:
        proj.int4_kernel = keep


def test_heads_wider_than_the_hidden_size(tmp_path):
    """A Llama whose query heads span more than its hidden size (4 x 32 against 64) and
    whose MLP is narrower than both: every buffer of the step is sized by its widest user;
    one stream is still the layer-by-layer step's, bit for bit."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=320,
        max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp_path)
    small = ModelRunner(
        ServerArgs(
            model_path=str(tmp_path), device="cpu", dtype="float32", quantization="int4",
            max_total_tokens=256,
        )
    )  # fmt: skip
    assert small.model.fused_decode is not None, cpu_decode.why_not(small.model)
    slots = small.pool.alloc(20)
    batch = decode_batch(small, [slots], seed=8)
    batch.input_ids %= 320
    ours, kv_ours = hidden(small, batch, fused=True)
    ref, kv_ref = hidden(small, batch, fused=False)
    assert torch.equal(ours, ref)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(kv_ours, kv_ref, strict=True))


def test_a_fused_step_keeps_every_thread(runner):
    """One parallel region spans the step, so the single-stream rule (one thread for the
    layers) does not apply to it."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        slots = runner.pool.alloc(3)
        batch = decode_batch(runner, [slots], seed=6)
        with runner._step_threads(batch):
            assert torch.get_num_threads() == 2
        runner.pool.free(slots)
    finally:
        torch.set_num_threads(before)


def test_thread_choice_follows_the_faster_and_keeps_checking_the_other():
    """All threads first, one thread next, then the faster of the two; every 4th step the
    other is timed again, so a change of load (here: all threads turn slow, then fast
    again) moves the choice within a few steps."""
    chooser = cpu_decode.ThreadChooser(explore=4, alpha=1.0)
    cost = {4: 1.0, 1: 2.0}  # seconds per step, as the machine would time them
    seen = []
    for step in range(40):
        if step == 12:
            cost[4] = 3.0  # another process takes a core: the barriers stall
        if step == 28:
            cost[4] = 1.0  # and leaves
        t = chooser.pick(1, 4)
        seen.append(t)
        chooser.record(1, t, cost[t])
    assert seen[:2] == [4, 1]
    assert seen[2:12].count(4) > seen[2:12].count(1)  # mostly four threads while they win
    assert seen[13:28].count(1) > seen[13:28].count(4)  # one thread once four stall
    assert seen[33:].count(4) > seen[33:].count(1)  # back to four once the load is gone
    assert chooser.pick(1, 1) == 1  # one thread to give: nothing to choose
    # sizes are timed apart: 3 rows share 4's bucket, 5 rows start afresh
    assert chooser.bucket(3) == chooser.bucket(4) != chooser.bucket(5)
    assert chooser.pick(5, 4) == 4
