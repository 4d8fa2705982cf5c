"""SGLang's control routes against the real server (issue 19, part 5): model info, load,
aliases, the torch profiler's trace, and a weights update that drains running requests."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from api_harness import Server

pytestmark = pytest.mark.slow


def _greedy(url: str, prompt: str, n: int = 24) -> str:
    body = {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": n}}
    r = httpx.post(url + "/generate", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()["text"]


def test_model_info_load_and_aliases(api_server: Server):
    url = api_server.url
    info = httpx.get(url + "/get_model_info").json()
    assert info["is_generation"] is True and info["model_path"].endswith(".gguf")
    assert info["context_length"] > 0 and info["vocab_size"] > 0
    ours = httpx.get(url + "/server_info").json()
    alias = httpx.get(url + "/get_server_info").json()
    assert alias["served_model_name"] == ours["served_model_name"] and alias["engine"]
    load = httpx.get(url + "/get_load").json()
    assert load[0]["dp_rank"] == 0 and load[0]["num_reqs"] >= 0
    assert load[0]["kv_total_tokens"] == ours["stats"]["kv_total_tokens"]
    ids = httpx.post(url + "/v1/tokenize", json={"prompt": "Hello world"}).json()
    assert ids == httpx.post(url + "/tokenize", json={"prompt": "Hello world"}).json()
    text = httpx.post(url + "/v1/detokenize", json={"tokens": ids["tokens"]}).json()["text"]
    assert text == "Hello world"


def test_profiler_writes_a_trace(api_server: Server, tmp_path):
    url = api_server.url
    r = httpx.post(url + "/start_profile", json={"output_dir": str(tmp_path)})
    assert r.status_code == 200 and r.json()["output_dir"] == str(tmp_path)
    again = httpx.post(url + "/start_profile", json={"output_dir": str(tmp_path)})
    assert again.status_code == 400 and "already" in again.json()["error"]["message"]
    _greedy(url, "The capital of France is", 4)
    r = httpx.post(url + "/stop_profile", timeout=120)
    assert r.status_code == 200
    trace = r.json()["trace"]
    assert os.path.dirname(trace) == str(tmp_path)
    with open(trace) as f:
        assert json.load(f)["traceEvents"]
    assert httpx.post(url + "/stop_profile").status_code == 400  # not running


def test_update_weights_drains_and_keeps_answers(api_server: Server):
    url = api_server.url
    path = httpx.get(url + "/get_model_info").json()["model_path"]
    prompts = ["Tell me about the sea.", "List three fruits.", "What is 2+2?"]
    before = [_greedy(url, p, 32) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(_greedy, url, p, 32) for p in prompts[:2]]
        update = pool.submit(
            httpx.post, url + "/update_weights_from_disk", json={"model_path": path}, timeout=600
        )
        during = pool.submit(_greedy, url, prompts[2], 32)  # sent while the update drains
        r = update.result()
        answers = [f.result() for f in running] + [during.result()]
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    assert answers == before  # none lost, none computed with half-swapped weights
    assert [_greedy(url, p, 32) for p in prompts] == before
    bad = httpx.post(url + "/update_weights_from_disk", json={"model_path": "/nope.gguf"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model_path"
