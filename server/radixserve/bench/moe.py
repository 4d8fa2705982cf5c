"""The MoE case of `radixserve bench --offline --moe`: a random-weight Qwen3-MoE with the
per-layer shape of a small real MoE (IBM Granite 3.0 1B-A400M: hidden 1024, 16 query / 8
KV heads, 32 experts of 512 columns, 8 routed per token), and where a step's time goes.

The model folder is written once per layer count into ~/.cache/radixserve with the
default model's tokenizer (same vocabulary size), so the ordinary offline benchmark runs on
it. The step profile then loads it in this process and times one prefill and a run of
decode steps with forward hooks on the router, the experts and the attention blocks
(projections and the attention backend); the rest is embeddings, norms, the dense
residual adds and the LM head.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

MOE_SHAPE = dict(
    hidden_size=1024,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=64,
    num_experts=32,
    num_experts_per_tok=8,
    moe_intermediate_size=512,
    intermediate_size=2048,
    norm_topk_prob=True,
    vocab_size=49152,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


def moe_model_dir(num_layers: int) -> str:
    """The random MoE's folder (written on first use, seeded)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "radixserve"
    path = cache / f"bench-moe-granite-shape-{num_layers}l"
    if (path / "config.json").exists():
        return str(path)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from radixserve.models.loader import load_tokenizer, resolve_model

    cfg = AutoConfig.for_model("qwen3_moe", num_hidden_layers=num_layers, **MOE_SHAPE)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    load_tokenizer(resolve_model(None)).save_pretrained(path)
    return str(path)


PROFILED = {"Router": "router", "FusedMoE": "experts", "FamilyAttention": "attention"}


def step_profile(
    model_path: str, engine_args: dict, batch: int = 8, prompt_len: int = 128, steps: int = 16
) -> dict[str, dict[str, float]]:
    """Milliseconds per step by part (router, experts, attention, rest, total) for one
    prefill of `batch` prompts and for decode steps of `batch` requests."""
    import torch

    from radixserve.config import ServerArgs
    from radixserve.engine.model_runner import ModelRunner
    from radixserve.layers.attention import ForwardBatch

    args = ServerArgs(model_path=model_path, **engine_args)
    runner = ModelRunner(args)
    spent: dict[str, float] = defaultdict(float)
    starts: dict[int, float] = {}
    sync = torch.cuda.synchronize if runner.device.startswith("cuda") else (lambda: None)

    def before(module, _inputs):
        sync()
        starts[id(module)] = time.perf_counter()

    def after(module, _inputs, _output):
        sync()
        spent[PROFILED[type(module).__name__]] += time.perf_counter() - starts.pop(id(module))

    for module in runner.model.modules():
        if type(module).__name__ in PROFILED:
            module.register_forward_pre_hook(before)
            module.register_forward_hook(after)

    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, runner.vocab_size, (prompt_len,), generator=gen) for _ in range(batch)
    ]
    slots = [runner.pool.alloc(prompt_len + steps) for _ in range(batch)]
    device = runner.device

    def run(ids, positions, loc, prefix, extend, prefill: bool) -> float:
        fb = ForwardBatch(
            input_ids=ids.to(device),
            positions=positions.to(device),
            out_cache_loc=loc.to(device),
            kv_pool=runner.pool,
            num_prefill_reqs=batch if prefill else 0,
            num_prefill_tokens=int(ids.numel()) if prefill else 0,
            prefix_lens=prefix,
            extend_lens=extend,
            req_slots=[s[: p + e] for s, p, e in zip(slots, prefix, extend, strict=True)],
        )
        sync()
        t = time.perf_counter()
        runner.forward(fb, torch.arange(batch, device=device) * (extend[0]) + extend[0] - 1)
        sync()
        return time.perf_counter() - t

    out: dict[str, dict[str, float]] = {}
    total = run(
        torch.cat(prompts),
        torch.arange(prompt_len).repeat(batch),
        torch.cat([s[:prompt_len] for s in slots]),
        [0] * batch,
        [prompt_len] * batch,
        prefill=True,
    )
    out["prefill"] = _split(spent, total, 1)
    spent.clear()
    total = 0.0
    for i in range(steps):
        pos = prompt_len + i
        total += run(
            torch.randint(0, runner.vocab_size, (batch,), generator=gen),
            torch.full((batch,), pos),
            torch.stack([s[pos] for s in slots]),
            [pos] * batch,
            [1] * batch,
            prefill=False,
        )
    out["decode"] = _split(spent, total, steps)
    return out


def _split(spent: dict[str, float], total: float, steps: int) -> dict[str, float]:
    ms = {k: 1e3 * spent.get(k, 0.0) / steps for k in PROFILED.values()}
    ms["rest"] = 1e3 * total / steps - sum(ms.values())
    ms["total"] = 1e3 * total / steps
    return ms


def format_profile(profile: dict[str, dict[str, float]], batch: int, prompt_len: int) -> str:
    from radixserve.bench.metrics import render_table

    rows = []
    for phase, ms in profile.items():
        what = f"{batch} x {prompt_len} tokens" if phase == "prefill" else f"batch {batch}"
        rows.append((f"{phase} step, {what} (ms):", f"{ms['total']:.2f}"))
        for part in ("router", "experts", "attention", "rest"):
            share = 100 * ms[part] / max(ms["total"], 1e-9)
            rows.append((f"  {part} (ms):", f"{ms[part]:.2f} ({share:.0f}%)"))
    return render_table("MoE Step Profile", rows)
