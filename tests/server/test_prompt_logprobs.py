"""Prompt logprobs (what evaluation harnesses call for loglikelihood tasks) against
transformers' float32 log-softmax: `/v1/completions` with echo + logprobs, and `/generate`
with return_logprob + logprob_start_len, on the float32 session server."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from radixserve.models.loader import default_model_path, resolve_model
from transformers import AutoModelForCausalLM, AutoTokenizer

TOL = 1e-3


@pytest.fixture(scope="module")
def reference():
    """The prompt's ids and, per position, transformers' logprob of that token."""
    src = resolve_model(default_model_path())
    tok = AutoTokenizer.from_pretrained(src.folder, gguf_file=src.gguf_file)
    ids = tok.encode("The quick brown fox jumps over the lazy dog. Paris is the capital of")
    model = AutoModelForCausalLM.from_pretrained(
        src.folder, gguf_file=src.gguf_file, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    scored = [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    best = [lp[i - 1].argmax().item() for i in range(1, len(ids))]
    return ids, scored, best, tok


def test_completions_echo_logprobs_equal_transformers_and_survive_a_cache_hit(
    api_server, reference
):
    ids, scored, best, tok = reference
    body = {"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0}
    runs = []
    for _ in range(2):  # the second finds the prompt in the prefix cache
        r = httpx.post(api_server.url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        runs.append(r.json())
    assert runs[1]["usage"]["completion_tokens"] == 0
    for out in runs:
        lps = out["choices"][0]["logprobs"]
        assert len(lps["tokens"]) == len(ids)
        assert lps["token_logprobs"][0] is None and lps["top_logprobs"][0] is None
        got = lps["token_logprobs"][1:]
        assert max(abs(a - b) for a, b in zip(got, scored, strict=True)) < TOL
        # top_logprobs holds the model's most likely token at each position
        for top, want in zip(lps["top_logprobs"][1:], best, strict=True):
            assert list(top) == [tok.decode([want])]
        assert out["choices"][0]["text"] == tok.decode(ids)


def test_generate_logprob_start_len_scores_the_prompt_from_there(api_server, reference):
    ids, scored, _, _ = reference
    start = 5
    body = {
        "input_ids": ids,
        "return_logprob": True,
        "logprob_start_len": start,
        "top_logprobs_num": 2,
        "sampling_params": {"max_new_tokens": 3, "temperature": 0},
    }
    r = httpx.post(api_server.url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]
    got = meta["input_token_logprobs"]
    assert [t for _, t, _ in got] == ids[start:]
    assert max(abs(lp - s) for (lp, _, _), s in zip(got, scored[start - 1 :], strict=True)) < TOL
    assert all(len(alts) == 2 for alts in meta["input_top_logprobs"])
    assert len(meta["output_token_logprobs"]) == 3  # the output's logprobs still come


def test_streamed_echo_sends_the_prompt_logprobs_first(api_server, reference):
    ids, scored, _, _ = reference
    body = {"prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 2, "stream": True,
            "temperature": 0}  # fmt: skip
    events = []
    with httpx.stream("POST", api_server.url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    first = events[0]["choices"][0]["logprobs"]
    assert first["token_logprobs"][0] is None
    echoed = first["token_logprobs"][1 : len(ids)]
    assert max(abs(a - b) for a, b in zip(echoed, scored, strict=True)) < TOL
    total = sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events if e["choices"])
    assert total == len(ids) + 2
