"""SGLang's native routes, /metrics, and disconnects freeing their requests."""

from __future__ import annotations

import json

import httpx
import pytest
from api_harness import error_of, metrics, wait_idle

pytestmark = pytest.mark.slow
GREEDY = {"temperature": 0, "max_new_tokens": 8}


def test_generate_text_and_ids(api_server):
    r = httpx.post(
        api_server.url + "/generate",
        json={"text": "The capital of France is", "sampling_params": GREEDY},
        timeout=60,
    )
    assert r.status_code == 200
    out = r.json()
    assert out["text"] and len(out["output_ids"]) == out["meta_info"]["completion_tokens"] == 8
    assert out["meta_info"]["finish_reason"] == {"type": "length", "matched": None}
    ids = httpx.post(api_server.url + "/tokenize", json={"prompt": "The capital of France is"})
    ids = ids.json()["tokens"]
    batch = httpx.post(
        api_server.url + "/generate",
        json={"input_ids": [ids, ids], "sampling_params": GREEDY, "return_logprob": True},
        timeout=60,
    ).json()
    assert [b["text"] for b in batch] == [out["text"]] * 2
    assert len(batch[0]["meta_info"]["output_token_logprobs"]) == 8


def test_generate_stream_is_cumulative(api_server):
    body = {"text": "The capital of France is", "sampling_params": GREEDY, "stream": True}
    with httpx.stream("POST", api_server.url + "/generate", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    texts = [e["text"] for e in events]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    alone = httpx.post(
        api_server.url + "/generate",
        json={"text": "The capital of France is", "sampling_params": GREEDY},
        timeout=60,
    ).json()
    assert texts[-1] == alone["text"] and events[-1]["meta_info"]["finish_reason"]


def test_generate_errors(api_server):
    url = api_server.url + "/generate"
    r = httpx.post(url, json={"text": "x", "sampling_params": {"temperatur": 1}})
    assert r.status_code == 400 and "temperatur" in error_of(r)["message"]
    r = httpx.post(url, json={"sampling_params": {}})
    assert r.status_code == 400 and error_of(r)["param"] == "text"
    r = httpx.post(url, json={"input_ids": [1, 2, 10**9]})
    assert r.status_code == 400 and error_of(r)["param"] == "input_ids"


def test_tokenize_detokenize_roundtrip(api_server):
    t = httpx.post(api_server.url + "/tokenize", json={"prompt": "Hello, world!"}).json()
    assert t["count"] == len(t["tokens"]) > 0 and t["max_model_len"] == 8192
    d = httpx.post(api_server.url + "/detokenize", json={"tokens": t["tokens"]}).json()
    assert d["text"] == "Hello, world!"


def test_server_info_health_flush(api_server):
    info = httpx.get(api_server.url + "/server_info").json()
    assert info["engine"]["context_length"] == 8192 and info["status"] == "ok"
    assert info["engine"]["max_total_tokens"] == 32768 and info["api_key"] is None
    assert info["dtype"] == "float32" and "version" in info
    assert httpx.get(api_server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(api_server.url + "/health_generate", timeout=60).status_code == 200
    wait_idle(api_server)
    r = httpx.post(api_server.url + "/flush_cache")
    assert r.status_code == 200 and r.json()["success"] is True


def test_abort_request_by_rid(api_server):
    body = {
        "text": "Count to one thousand:",
        "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True},
        "stream": True,
        "rid": "abort-me",
    }
    with httpx.stream("POST", api_server.url + "/generate", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        aborted = httpx.post(api_server.url + "/abort_request", json={"rid": "abort-me"}).json()
        assert aborted["aborted"] == ["abort-me"]
        events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert events[-1]["meta_info"]["completion_tokens"] < 3000
    wait_idle(api_server)


def test_stream_disconnect_frees_the_request(api_server):
    before = wait_idle(api_server)
    body = {"prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", api_server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            assert next(line for line in lines if line.startswith("data: {"))
    # the connection is closed; the engine must drop the request
    after = wait_idle(api_server)
    assert after["generation_tokens"] - before["generation_tokens"] < 3000


def test_non_stream_disconnect_frees_the_request(api_server):
    before = wait_idle(api_server)
    body = {"prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(api_server.url + "/v1/completions", json=body, timeout=3)
    after = wait_idle(api_server)
    assert after["generation_tokens"] - before["generation_tokens"] < 3000


def test_metrics_names_and_counts(api_server):
    wait_idle(api_server)
    m0 = metrics(api_server)
    names = {name for name, _ in m0}
    for name in (
        "radixserve_num_running_reqs",
        "radixserve_num_queue_reqs",
        "radixserve_kv_cache_usage_ratio",
        "radixserve_prefix_cache_hit_tokens_total",
        "radixserve_prompt_tokens_total",
        "radixserve_generation_tokens_total",
        "radixserve_time_to_first_token_seconds_count",
        "radixserve_inter_token_latency_seconds_count",
        "radixserve_e2e_request_latency_seconds_count",
        "radixserve_queue_time_seconds_count",
        "radixserve_http_requests_total",
    ):
        assert name in names, name
    r = httpx.post(
        api_server.url + "/v1/completions",
        json={"prompt": "Metrics are", "max_tokens": 5, "ignore_eos": True},
        timeout=60,
    ).json()
    bad = httpx.post(api_server.url + "/v1/completions", json={"prompt": "x", "n": 0})
    assert bad.status_code == 400
    wait_idle(api_server)
    m1 = metrics(api_server)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return m1.get(key, 0) - m0.get(key, 0)

    assert delta("radixserve_prompt_tokens_total") == r["usage"]["prompt_tokens"]
    assert delta("radixserve_generation_tokens_total") == 5
    assert delta("radixserve_e2e_request_latency_seconds_count") == 1
    assert delta("radixserve_queue_time_seconds_count") == 1
    assert delta("radixserve_time_to_first_token_seconds_count") == 1
    assert delta("radixserve_inter_token_latency_seconds_count") == 4
    assert delta("radixserve_finished_sequences_total", finish_reason="length") == 1
    route = "/v1/completions"
    assert delta("radixserve_http_requests_total", route=route, status="200") == 1
    assert delta("radixserve_http_requests_total", route=route, status="400") == 1
    assert m1[("radixserve_num_running_reqs", ())] == 0
