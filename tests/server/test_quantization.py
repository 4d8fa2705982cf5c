"""Weight-only int4 for small CPU batches: the packing is exact for weights on a 4-bit grid
(what a Q4 GGUF holds), batches above the threshold keep the dense path, `auto` picks int4
only where it loses nothing, and the default model still answers correctly with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from radixserve.config import ServerArgs
from radixserve.engine.engine_process import eos_token_ids
from radixserve.engine.io_struct import TokenizedGenerateReq
from radixserve.engine.model_runner import ModelRunner, resolve_quantization
from radixserve.engine.sampling_params import SamplingParams
from radixserve.engine.scheduler import Scheduler
from radixserve.layers.linear import (
    INT4_GROUP,
    SMALL_BATCH_ROWS,
    ColumnParallelLinear,
    VocabParallelEmbedding,
    lm_logits,
    pack_int4,
)
from radixserve.models.loader import default_model_path, load_tokenizer, resolve_model


def grid_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A weight whose every group of 32 is min + scale * q, q in 0..15 with both ends used,
    and scale/min exact in bfloat16: the shape of a dequantized Q4_1 tensor."""
    g = torch.Generator().manual_seed(seed)
    groups = k // INT4_GROUP
    q = torch.randint(0, 16, (n, groups, INT4_GROUP), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    scale = (torch.rand(n, groups, 1, generator=g) * 0.01 + 0.001).bfloat16().float()
    low = (-torch.rand(n, groups, 1, generator=g) * 0.08).bfloat16().float()
    return (q * scale + low).reshape(n, k)


def test_int4_pack_is_exact_on_a_4bit_grid():
    w = grid_weight(96, 128)
    packed = pack_int4(w)
    assert packed is not None
    x = torch.randn(3, 128).bfloat16()
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed[0], INT4_GROUP, packed[1])
    ref = F.linear(x.float(), w)
    # only the bfloat16 output rounds: well under one quantisation step of the weights
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_pack_refuses_shapes_the_kernel_cannot_take():
    assert pack_int4(torch.randn(96, 100)) is None  # input not a multiple of the group
    assert pack_int4(torch.randn(90, 128)) is None  # output not a multiple of 8


def test_linear_uses_int4_only_for_small_batches():
    lin = ColumnParallelLinear(128, 96, bias=True).bfloat16()
    with torch.no_grad():
        lin.weight.copy_(grid_weight(96, 128, seed=1))
        lin.bias.copy_(torch.randn(96))
    x = torch.randn(SMALL_BATCH_ROWS + 1, 128).bfloat16()
    dense_small, dense_big = lin(x[:2]), lin(x)
    assert lin.quantize_int4()
    # a changed dense weight shows which path ran: small batches do not read it
    with torch.no_grad():
        lin.weight.zero_()
    small, big = lin(x[:2]), lin(x)
    torch.testing.assert_close(small.float(), dense_small.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(big, F.linear(x, lin.weight, lin.bias))
    assert not torch.allclose(big.float(), dense_big.float())


def test_int8_head_scores_small_batches_close_to_dense():
    head = VocabParallelEmbedding(512, 64).bfloat16()
    with torch.no_grad():
        head.weight.normal_(0, 0.05)
    hidden = torch.randn(2, 64).bfloat16()
    dense = lm_logits(hidden, head)
    assert head.quantize_int8()
    q = lm_logits(hidden, head)
    assert q.dtype == torch.float32
    assert (q - dense).abs().max() < 0.02 * dense.abs().max()
    assert torch.equal(lm_logits(hidden.repeat(8, 1), head)[:2], dense)  # big batch: dense


def test_auto_quantization_choice():
    gguf = resolve_model(default_model_path())
    assert resolve_quantization("auto", gguf, "cpu", torch.bfloat16) == "int4"  # a Q4_1 file
    assert resolve_quantization("auto", gguf, "cpu", torch.float32) == "none"  # exact mode
    assert resolve_quantization("auto", gguf, "cuda", torch.bfloat16) == "none"
    assert resolve_quantization("none", gguf, "cpu", torch.bfloat16) == "none"
    with pytest.raises(ValueError, match="CPU only"):
        resolve_quantization("int4", gguf, "cuda", torch.bfloat16)


@pytest.mark.slow
def test_default_model_answers_with_int4_decode():
    """The default settings on the CPU (bfloat16, auto) decode one request in int4."""
    args = ServerArgs(device="cpu", max_total_tokens=4096)
    runner = ModelRunner(args)
    assert runner.quantization == "int4"
    tok = load_tokenizer(runner.source)
    sched = Scheduler(args, runner, tok, eos_token_ids(runner.config, tok, runner.source.folder))
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=True,
    )
    ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
    sched.add_request(TokenizedGenerateReq("q", ids, SamplingParams(max_new_tokens=24)))
    out: list[int] = []
    while sched.has_work():
        for o in sched.step():
            out += o.new_token_ids
    assert tok.decode(out, skip_special_tokens=True).strip() == "The capital of France is Paris."
