"""Offline throughput: the in-process `radixserve.Engine`, no HTTP, no tokenizer round trip.

Comparing this with the online figures separates the engine's speed from the server's
overhead (HTTP, SSE, detokenization in the other process).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from radixserve.bench.datasets import BenchRequest
from radixserve.bench.metrics import render_table, throughput_rows, throughputs


@dataclass
class OfflineMetrics:
    """Throughput of one `Engine.generate` call over the whole workload."""

    completed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    cached_tokens: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    total_throughput: float
    # per-step profile of the timed run (engine process, plus detokenization in the front)
    steps: int = 0
    step_ms: float = 0.0
    schedule_ms: float = 0.0
    forward_ms: float = 0.0
    sample_ms: float = 0.0
    output_ms: float = 0.0
    detokenize_ms: float = 0.0
    scheduler_share: float = 0.0  # schedule + output time over the whole step
    mean_batch_tokens: float = 0.0
    # model FLOPs utilisation against this CPU's measured matmul peak for the path in use
    model_tflops: float = 0.0
    peak_kind: str = ""
    peak_tflops: float = 0.0
    mfu: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sampling_params(request: BenchRequest, ignore_eos: bool) -> dict[str, Any]:
    return {"max_new_tokens": request.output_len, "temperature": 0.0, "ignore_eos": ignore_eos}


def run_offline(
    requests: list[BenchRequest],
    *,
    model_path: str | None = None,
    engine_args: dict[str, Any] | None = None,
    warmup: Sequence[BenchRequest] = (),
    ignore_eos: bool = True,
) -> OfflineMetrics:
    """Submit the whole workload in one `generate` call and time it.

    All requests are handed over at once, so the engine's scheduler alone decides batching:
    this is the upper bound the online figures approach at high concurrency.
    """
    from radixserve import Engine

    with Engine(model_path=model_path, **(engine_args or {})) as engine:
        if warmup:
            engine.generate(
                prompt=[r.prompt for r in warmup],
                sampling_params=[sampling_params(r, ignore_eos) for r in warmup],
            )
        before = engine.get_server_info()["stats"]
        start = time.perf_counter()
        outputs = engine.generate(
            prompt=[r.prompt for r in requests],
            sampling_params=[sampling_params(r, ignore_eos) for r in requests],
        )
        duration = time.perf_counter() - start
        after = engine.get_server_info()["stats"]
        source = engine.info.model_path
        engine_info = engine.get_server_info()["engine"] or {}
    delta = {k: after[k] - before[k] for k in after if isinstance(after[k], int | float)}

    metas = [o["meta_info"] for o in outputs]
    total_in = sum(int(m["prompt_tokens"]) for m in metas)
    total_out = sum(int(m["completion_tokens"]) for m in metas)
    cached = sum(int(m.get("cached_tokens", 0)) for m in metas)
    d = max(duration, 1e-9)
    steps = max(int(delta.get("forward_steps", 0)), 1)
    ms = {k: 1e3 * delta.get(f"time_{k}_s", 0.0) / steps for k in PHASES}
    step_ms = sum(v for k, v in ms.items() if k != "detokenize")  # the front overlaps it
    flops = model_flops(source, int(delta.get("forward_tokens", 0)), len(outputs) + total_out)
    path = engine_info.get("quantization") or "none"
    if path not in ("int8",):
        path = engine_info.get("dtype", "float32")
    peak = matmul_peak(path)
    return OfflineMetrics(
        completed=len(outputs),
        duration_s=duration,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        cached_tokens=cached,
        **throughputs(duration, len(outputs), total_in, total_out),
        steps=steps,
        step_ms=step_ms,
        schedule_ms=ms["schedule"],
        forward_ms=ms["forward"],
        sample_ms=ms["sample"],
        output_ms=ms["output"],
        detokenize_ms=ms["detokenize"],
        scheduler_share=(ms["schedule"] + ms["output"]) / max(step_ms, 1e-9),
        mean_batch_tokens=delta.get("forward_tokens", 0) / steps,
        model_tflops=flops / d / 1e12,
        peak_kind=path,
        peak_tflops=peak / 1e12,
        mfu=flops / d / peak if peak else 0.0,
    )


PHASES = ("schedule", "forward", "sample", "output", "detokenize")


def model_flops(model_path: str, forward_tokens: int, logit_rows: int) -> float:
    """2 x matmul weights per token through the layers, plus the LM head for each row that
    was scored (one per generated token, and one per prompt). Attention's own FLOPs are
    left out: at these context lengths they are a few percent."""
    from radixserve.models.loader import load_config, resolve_model

    cfg = load_config(resolve_model(model_path))
    h, inter = cfg.hidden_size, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    if experts:  # a MoE token goes through the router and its top k experts only
        inter = getattr(cfg, "moe_intermediate_size", None) or inter
        mlp = h * experts + cfg.num_experts_per_tok * 3 * h * inter
    else:
        mlp = 3 * h * inter
    per_layer = h * (q + 2 * kv) + q * h + mlp
    return 2.0 * (
        cfg.num_hidden_layers * per_layer * forward_tokens + cfg.vocab_size * h * logit_rows
    )


def matmul_peak(kind: str, size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a large matmul of the path in use (float32, bfloat16, float16, or int8
    through fbgemm) on this machine's threads: the ceiling for MFU. Measured once per CPU,
    kind and thread count and kept in ~/.cache/radixserve, since an emulated dtype can take
    minutes to measure."""
    import torch

    from radixserve.engine.cpu_path import cpu_class

    key = f"{platform.processor() or platform.machine()}|{cpu_class()[1]}|{kind}|{size}|{torch.get_num_threads()}"
    cache = (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "radixserve"
        / "matmul_peak.json"
    )
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return float(known[key])
    a = torch.randn(size, size)
    if kind == "int8":
        from radixserve.layers.linear import int8_dynamic_mm, pack_int8_dynamic

        packed = pack_int8_dynamic(torch.randn(size, size))

        def run() -> None:
            int8_dynamic_mm(a, packed)
    else:
        a = a.to(getattr(torch, kind))
        b = torch.randn(size, size).to(a.dtype)

        def run() -> None:
            a @ b

    run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    peak = 2.0 * size**3 / best
    known[key] = peak
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known, indent=1))
    except OSError:
        pass  # a read-only home: measured again next time
    return peak


def format_offline(m: OfflineMetrics) -> str:
    rows = [
        ("Completed requests:", str(m.completed)),
        ("Duration (s):", f"{m.duration_s:.2f}"),
        ("Total input tokens:", str(m.total_input_tokens)),
        ("  of which prefix-cache hits:", str(m.cached_tokens)),
        ("Total generated tokens:", str(m.total_output_tokens)),
        *throughput_rows(m),
        ("Forward steps:", str(m.steps)),
        ("Mean tokens per step:", f"{m.mean_batch_tokens:.1f}"),
        ("Step time (ms):", f"{m.step_ms:.2f}"),
        ("  scheduling (ms):", f"{m.schedule_ms:.2f}"),
        ("  forward (ms):", f"{m.forward_ms:.2f}"),
        ("  sampling (ms):", f"{m.sample_ms:.2f}"),
        ("  outputs and stop checks (ms):", f"{m.output_ms:.2f}"),
        ("Detokenization in the front, overlapped (ms):", f"{m.detokenize_ms:.2f}"),
        ("Scheduler share of a step:", f"{100 * m.scheduler_share:.1f}%"),
        ("Model TFLOP/s:", f"{m.model_tflops:.3f}"),
        (f"{m.peak_kind} matmul peak TFLOP/s:", f"{m.peak_tflops:.3f}"),
        ("MFU:", f"{100 * m.mfu:.1f}%"),
    ]
    return render_table("Offline Engine Benchmark", rows)
