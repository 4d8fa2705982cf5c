"""Prometheus metrics, all named `radixserve_*`, in a registry of the app's own.

Engine-side numbers (running, queued, KV usage, token counters) are read from the engine's
latest stats at scrape time, so they cannot drift from the engine. Latencies are measured
here, in the HTTP process, where the client's clock runs.

The Gateway API Inference Extension's endpoint picker reads its gauges under vLLM's names by
default (its model-server protocol: queued, running, KV utilisation 0-1, the cache-config and
LoRA info metrics). `_PickerCollector` exports exactly those, from the same engine stats as
ours, so a picker with its default flags routes to radixserve with no extra configuration.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from radixserve.engine.client import GenerateChunk
from radixserve.engine.io_struct import EngineStats

logger = logging.getLogger("radixserve.requests")

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _EngineCollector:
    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self):
        s = self._stats()
        yield GaugeMetricFamily(
            "radixserve_num_running_reqs", "requests decoding now", value=s.num_running
        )
        yield GaugeMetricFamily(
            "radixserve_num_queue_reqs", "requests waiting for admission", value=s.num_waiting
        )
        yield GaugeMetricFamily(
            "radixserve_kv_cache_usage_ratio",
            "KV slots held by requests / all KV slots (cached prefixes not counted)",
            value=s.kv_usage,
        )
        yield GaugeMetricFamily(
            "radixserve_kv_cache_total_tokens", "KV cache capacity", value=s.kv_total_tokens
        )
        for name, doc, value in (
            ("prefix_cache_hit_tokens", "prompt tokens served from the prefix cache", s.cache_hit_tokens),
            ("prompt_tokens", "prompt tokens admitted", s.prompt_tokens),
            ("generation_tokens", "tokens generated", s.generation_tokens),
            ("retractions", "requests preempted for lack of KV memory", s.num_retractions),
            ("spec_draft_tokens", "tokens speculative decoding drafted", s.spec_draft_tokens),
            ("spec_accepted_tokens", "drafted tokens the model accepted", s.spec_accepted_tokens),
        ):  # fmt: skip
            yield CounterMetricFamily(f"radixserve_{name}", doc, value=value)


class _PickerCollector:
    """vLLM's names for what the Inference Extension's picker scrapes (every 50 ms by default).

    Labels follow vLLM (`model_name`); values come from the same `EngineStats` as
    `radixserve_*`. The KV pool is paged one token a page, so a "block" is one token.
    """

    def __init__(self, stats: Callable[[], EngineStats], model_name: Callable[[], str]) -> None:
        self._stats = stats
        self._model_name = model_name

    def collect(self):
        s = self._stats()
        labels = {"model_name": self._model_name()}

        def gauge(name: str, doc: str, value: float, extra: dict[str, str] | None = None):
            g = GaugeMetricFamily(name, doc, labels=[*labels, *(extra or {})])
            g.add_metric([*labels.values(), *(extra or {}).values()], value)
            return g

        yield gauge("vllm:num_requests_waiting", "requests waiting (picker)", s.num_waiting)
        yield gauge("vllm:num_requests_running", "requests running (picker)", s.num_running)
        yield gauge("vllm:kv_cache_usage_perc", "KV cache usage, 0-1 (picker)", s.kv_usage)
        cache = {"block_size": "1", "num_gpu_blocks": str(s.kv_total_tokens)}
        yield gauge("vllm:cache_config_info", "KV cache layout (picker)", 1.0, cache)
        lora = {
            "max_lora": str(s.max_loras),
            "running_lora_adapters": ",".join(s.running_lora_adapters),
            "waiting_lora_adapters": ",".join(s.waiting_lora_adapters),
        }
        # the value is the time of the reading: the picker keeps the newest series
        yield gauge("vllm:lora_requests_info", "LoRA adapters in use (picker)", time.time(), lora)


class Metrics:
    def __init__(
        self,
        stats: Callable[[], EngineStats],
        log_requests: bool = False,
        model_name: Callable[[], str] = lambda: "",
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        self.registry.register(_PickerCollector(stats, model_name))
        self.log_requests = log_requests
        reg = {"registry": self.registry}
        self.http_requests = Counter(
            "radixserve_http_requests",
            "HTTP requests answered, by route and status code",
            ["route", "status"],
            **reg,
        )
        self.finished = Counter(
            "radixserve_finished_sequences",
            "generated sequences, by finish reason (stop, length, abort)",
            ["finish_reason"],
            **reg,
        )
        latency = {"buckets": _LATENCY_BUCKETS, **reg}
        self.ttft = Histogram(
            "radixserve_time_to_first_token_seconds", "arrival to first generated token", **latency
        )
        self.itl = Histogram(
            "radixserve_inter_token_latency_seconds",
            "time between generated tokens of one sequence",
            buckets=_ITL_BUCKETS,
            **reg,
        )
        self.e2e = Histogram(
            "radixserve_e2e_request_latency_seconds", "arrival to last token", **latency
        )

        # admission control's own counts (api/admission.py), kept in this process
        self.open_sequences = Gauge(
            "radixserve_open_sequences",
            "sequences admitted by the HTTP server and not finished (queued or running)",
            **reg,
        )
        self.queued_prompt_tokens = Gauge(
            "radixserve_queued_prompt_tokens",
            "prompt tokens of admitted sequences that have no output yet (what "
            "--max-queued-tokens bounds)",
            **reg,
        )
        self.queue_time = Histogram(
            "radixserve_queue_time_seconds",
            "time a sequence waited in the engine's queue before its first prefill",
            **latency,
        )

    def timer(self, arrival: float, route: str) -> SequenceTimer:
        return SequenceTimer(self, arrival, route)


class SequenceTimer:
    """Feeds one sequence's chunks into the latency histograms as they pass by."""

    def __init__(self, metrics: Metrics, arrival: float, route: str) -> None:
        self.m = metrics
        self.arrival = arrival
        self.route = route
        self.last: float | None = None
        self.done = False

    def on_chunk(self, chunk: GenerateChunk) -> None:
        now = time.perf_counter()
        if chunk.queue_time is not None:
            self.m.queue_time.observe(chunk.queue_time)
        if chunk.new_ids:
            if self.last is None:
                self.m.ttft.observe(now - self.arrival)
            else:
                gap = (now - self.last) / len(chunk.new_ids)
                for _ in chunk.new_ids:
                    self.m.itl.observe(gap)
            self.last = now
        if chunk.finish_reason is not None and not self.done:
            self.done = True
            reason = chunk.finish_reason.type
            self.m.e2e.observe(now - self.arrival)
            self.m.finished.labels(reason).inc()
            if self.m.log_requests:
                logger.info(
                    "%s %s: prompt %d (cached %d), completion %d, finish %s, %.3fs",
                    self.route,
                    chunk.rid,
                    chunk.prompt_tokens,
                    chunk.cached_tokens,
                    chunk.completion_tokens,
                    reason,
                    now - self.arrival,
                )
