"""Offline throughput: the in-process `radixserve.Engine`, no HTTP, no tokenizer round trip.

Comparing this with the online figures separates the engine's speed from the server's
overhead (HTTP, SSE, detokenization in the other process).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from radixserve.bench.datasets import BenchRequest


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
        start = time.perf_counter()
        outputs = engine.generate(
            prompt=[r.prompt for r in requests],
            sampling_params=[sampling_params(r, ignore_eos) for r in requests],
        )
        duration = time.perf_counter() - start

    metas = [o["meta_info"] for o in outputs]
    total_in = sum(int(m["prompt_tokens"]) for m in metas)
    total_out = sum(int(m["completion_tokens"]) for m in metas)
    cached = sum(int(m.get("cached_tokens", 0)) for m in metas)
    d = max(duration, 1e-9)
    return OfflineMetrics(
        completed=len(outputs),
        duration_s=duration,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        cached_tokens=cached,
        request_throughput=len(outputs) / d,
        input_throughput=total_in / d,
        output_throughput=total_out / d,
        total_throughput=(total_in + total_out) / d,
    )


def format_offline(m: OfflineMetrics) -> str:
    width = 50
    rows = [
        ("Completed requests:", str(m.completed)),
        ("Duration (s):", f"{m.duration_s:.2f}"),
        ("Total input tokens:", str(m.total_input_tokens)),
        ("  of which prefix-cache hits:", str(m.cached_tokens)),
        ("Total generated tokens:", str(m.total_output_tokens)),
        ("Request throughput (req/s):", f"{m.request_throughput:.2f}"),
        ("Input token throughput (tok/s):", f"{m.input_throughput:.2f}"),
        ("Output token throughput (tok/s):", f"{m.output_throughput:.2f}"),
        ("Total token throughput (tok/s):", f"{m.total_throughput:.2f}"),
    ]
    lines = [" Offline Engine Benchmark ".center(width, "=")]
    lines += [f"{label:<40}{value:>10}" for label, value in rows]
    lines.append("=" * width)
    return "\n".join(lines)
