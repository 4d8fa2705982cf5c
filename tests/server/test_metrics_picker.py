"""/metrics against the Gateway API Inference Extension's model-server protocol.

The list below is the protocol's (proposal 003) with the names its endpoint picker scrapes by
default, written from the protocol, not from our code: a picker started with no metric
flags must find every one, with the type and meaning the protocol gives it.
"""

from __future__ import annotations

import threading
import time

import httpx
from api_harness import wait_idle
from prometheus_client.parser import text_string_to_metric_families

# protocol metric -> (the picker's default name, type, required labels)
PROTOCOL = {
    "TotalQueuedRequests": ("vllm:num_requests_waiting", "gauge", set()),
    "TotalRunningRequests": ("vllm:num_requests_running", "gauge", set()),
    "KVCacheUtilization": ("vllm:kv_cache_usage_perc", "gauge", set()),
    "CacheInfo": ("vllm:cache_config_info", "gauge", {"block_size", "num_gpu_blocks"}),
    "LoraInfo": (
        "vllm:lora_requests_info",
        "gauge",
        {"max_lora", "running_lora_adapters", "waiting_lora_adapters"},
    ),
}


def scrape(url: str) -> dict[str, tuple[str, list]]:
    families = text_string_to_metric_families(httpx.get(url + "/metrics").text)
    return {f.name: (f.type, f.samples) for f in families}


def one(families: dict, name: str):
    kind, samples = families[name]
    assert len(samples) == 1, samples
    return kind, samples[0]


def test_every_protocol_metric_has_its_default_name_type_and_labels(api_server):
    wait_idle(api_server)
    families = scrape(api_server.url)
    for metric, (name, kind, labels) in PROTOCOL.items():
        assert name in families, f"{metric}: {name} missing"
        got_kind, sample = one(families, name)
        assert got_kind == kind, (name, got_kind)
        assert labels <= set(sample.labels), (name, sample.labels)
    # idle: nothing queued or running, no KV held by requests
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running"):
        assert one(families, name)[1].value == 0
    assert one(families, "vllm:kv_cache_usage_perc")[1].value == 0
    info = httpx.get(api_server.url + "/server_info").json()
    cache = one(families, "vllm:cache_config_info")[1].labels
    blocks = int(cache["block_size"]) * int(cache["num_gpu_blocks"])
    assert blocks == info["stats"]["kv_total_tokens"], (cache, info["stats"])
    lora = one(families, "vllm:lora_requests_info")[1]
    assert int(lora.labels["max_lora"]) >= 0
    assert lora.labels["running_lora_adapters"] == ""  # no adapter is in use
    assert abs(lora.value - time.time()) < 60  # the value is the reading's timestamp


def test_running_and_kv_utilisation_move_with_a_request(api_server):
    """While one long request decodes the picker sees it running and its KV held (0-1]."""
    wait_idle(api_server)
    body = {"prompt": "Count slowly:", "max_tokens": 400, "ignore_eos": True, "stream": True}
    seen: list[tuple[float, float]] = []
    started = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", api_server.url + "/v1/completions", json=body, timeout=120) as r:
            for _ in r.iter_lines():
                started.set()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(60)
    for _ in range(5):
        f = scrape(api_server.url)
        running = one(f, "vllm:num_requests_running")[1].value
        usage = one(f, "vllm:kv_cache_usage_perc")[1].value
        seen.append((running, usage))
        time.sleep(0.05)
    t.join(120)
    assert any(r >= 1 and 0 < u <= 1 for r, u in seen), seen
    wait_idle(api_server)
    after = scrape(api_server.url)
    assert one(after, "vllm:num_requests_running")[1].value == 0
