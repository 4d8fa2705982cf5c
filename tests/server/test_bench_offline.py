"""`radixserve bench --offline`: the per-step profile adds up, and the FLOP count behind
MFU is the model's own matmul weights."""

from __future__ import annotations

import pytest
import torch
from radixserve.bench.datasets import BenchRequest
from radixserve.bench.offline import model_flops, run_offline
from radixserve.models.loader import default_model_path, load_config, resolve_model


def test_model_flops_counts_the_matmul_weights():
    path = default_model_path()
    cfg = load_config(resolve_model(path))
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(cfg)
    layer_weights = sum(
        m.weight.numel()
        for name, m in ref.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in name
    )
    head = cfg.vocab_size * cfg.hidden_size
    assert model_flops(path, 10, 0) == 2 * 10 * layer_weights
    assert model_flops(path, 0, 3) == 2 * 3 * head


@pytest.mark.slow
def test_offline_profile_adds_up():
    reqs = [BenchRequest(f"Count to ten, please, number {i}:", 12, 8) for i in range(4)]
    m = run_offline(reqs, engine_args={"dtype": "float32", "max_total_tokens": 4096})
    assert m.completed == 4 and m.total_output_tokens == 32
    # 4 requests of 8 tokens: at least 8 steps, at most one per token plus prefills
    assert 8 <= m.steps <= 32 + 4
    phases = m.schedule_ms + m.forward_ms + m.sample_ms + m.output_ms
    assert m.step_ms == pytest.approx(phases)
    assert m.forward_ms > m.sample_ms > 0
    assert 0 < m.scheduler_share < 1
    assert m.mean_batch_tokens >= 1
    assert m.peak_tflops > 0 and 0 < m.mfu < 1
