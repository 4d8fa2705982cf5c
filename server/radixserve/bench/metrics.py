"""Benchmark arithmetic: per-request timings in, throughput and latency summaries out.

Definitions follow SGLang's bench_serving so figures compare with its published ones:
TTFT is send-to-first-token, ITL the gaps between streamed tokens, TPOT a request's decode
time per output token after the first, E2E send-to-last-byte.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class RequestResult:
    """What one request measured. Times are seconds from when it was sent."""

    success: bool = False
    prompt_len: int = 0
    output_len: int = 0
    generated_text: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""
    constrained: bool = False  # answer constrained by a JSON schema


def constrained_cost(results: list[RequestResult]) -> dict[str, float] | None:
    """Mean time per output token of constrained vs plain requests of one run, and their
    ratio: what the grammar masks cost (None unless both kinds finished)."""

    def tpot(group: list[RequestResult]) -> float | None:
        vals = [
            (r.latency - r.ttft) / (r.output_len - 1)
            for r in group
            if r.success and r.output_len > 1
        ]
        return sum(vals) / len(vals) if vals else None

    with_schema = tpot([r for r in results if r.constrained])
    plain = tpot([r for r in results if not r.constrained])
    if with_schema is None or plain is None:
        return None
    return {
        "tpot_constrained_ms": with_schema * 1000,
        "tpot_plain_ms": plain * 1000,
        "tpot_ratio": with_schema / plain,
    }


@dataclass
class Stat:
    """Mean, median, p99 (and std, max) of one latency, in milliseconds."""

    mean: float = 0.0
    median: float = 0.0
    p99: float = 0.0
    std: float = 0.0
    max: float = 0.0

    @classmethod
    def of(cls, seconds: list[float]) -> Stat:
        if not seconds:
            return cls()
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        return cls(
            mean=float(ms.mean()),
            median=float(np.median(ms)),
            p99=float(np.percentile(ms, 99)),
            std=float(ms.std()),
            max=float(ms.max()),
        )


@dataclass
class BenchMetrics:
    """One run's summary: counts, throughputs (per second of wall time) and latencies."""

    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    total_throughput: float
    concurrency: float
    ttft_ms: Stat
    tpot_ms: Stat
    itl_ms: Stat
    e2e_latency_ms: Stat

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def throughputs(
    duration_s: float, requests: int, input_tokens: int, output_tokens: int
) -> dict[str, float]:
    """The per-second rates both benchmarks (online and offline) report, under the field
    names both summaries use."""
    d = max(duration_s, 1e-9)
    return {
        "request_throughput": requests / d,
        "input_throughput": input_tokens / d,
        "output_throughput": output_tokens / d,
        "total_throughput": (input_tokens + output_tokens) / d,
    }


def throughput_rows(m: Any) -> list[tuple[str, str]]:
    """The report lines for `throughputs`' fields of a summary."""
    return [
        ("Request throughput (req/s):", f"{m.request_throughput:.2f}"),
        ("Input token throughput (tok/s):", f"{m.input_throughput:.2f}"),
        ("Output token throughput (tok/s):", f"{m.output_throughput:.2f}"),
        ("Total token throughput (tok/s):", f"{m.total_throughput:.2f}"),
    ]


def render_table(title: str, rows: list[tuple[str, str]]) -> str:
    """Label-value lines framed to bench_serving's 50 columns; a `-name-` label with no
    value is a section heading."""
    width = 50
    lines = [f" {title} ".center(width, "=")]
    for label, value in rows:
        if label.startswith("-") and not value:
            lines.append(label.strip("-").center(width, "-"))
        else:
            lines.append(f"{label:<40}{value:>10}")
    lines.append("=" * width)
    return "\n".join(lines)


def compute_metrics(results: list[RequestResult], duration_s: float) -> BenchMetrics:
    """Summarise a run; failed requests count only in `failed`.

    TPOT is taken only over requests with more than one output token, since a single token
    has no decode phase; `concurrency` is the mean number of requests in flight.
    """
    ok = [r for r in results if r.success]
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    itls = [gap for r in ok for gap in r.itl]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    return BenchMetrics(
        completed=len(ok),
        failed=len(results) - len(ok),
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        **throughputs(duration_s, len(ok), total_in, total_out),
        concurrency=sum(r.latency for r in ok) / max(duration_s, 1e-9),
        ttft_ms=Stat.of([r.ttft for r in ok]),
        tpot_ms=Stat.of(tpots),
        itl_ms=Stat.of(itls),
        e2e_latency_ms=Stat.of([r.latency for r in ok]),
    )


def format_table(m: BenchMetrics, title: str = "Serving Benchmark Result") -> str:
    """The printed report, one metric a line, in bench_serving's layout."""
    rows: list[tuple[str, str]] = [
        ("Successful requests:", str(m.completed)),
        ("Failed requests:", str(m.failed)),
        ("Benchmark duration (s):", f"{m.duration_s:.2f}"),
        ("Total input tokens:", str(m.total_input_tokens)),
        ("Total generated tokens:", str(m.total_output_tokens)),
        *throughput_rows(m),
        ("Concurrency:", f"{m.concurrency:.2f}"),
    ]
    for name, short, stat in (
        ("End-to-End Latency", "E2E Latency", m.e2e_latency_ms),
        ("Time to First Token", "TTFT", m.ttft_ms),
        ("Time per Output Token (excl. 1st token)", "TPOT", m.tpot_ms),
        ("Inter-Token Latency", "ITL", m.itl_ms),
    ):
        rows.append((f"-{name}-", ""))
        for label in ("mean", "median", "p99"):
            rows.append((f"{label.capitalize()} {short} (ms):", f"{getattr(stat, label):.2f}"))
    return render_table(title, rows)
