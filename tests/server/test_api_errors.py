"""Bad requests: each a 400 (413, 404) in OpenAI's error shape naming the field, and the
server healthy afterwards."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from api_harness import Server, error_of

pytestmark = pytest.mark.slow
MSG = [{"role": "user", "content": "Hi"}]


def post(server: Server, path: str, body) -> httpx.Response:
    """POST a body as given (str, bytes) or as ASCII JSON (which can carry a lone surrogate
    as an escape, where httpx's own encoding would fail)."""
    if not isinstance(body, str | bytes):
        body = json.dumps(body)
    return httpx.post(
        server.url + path, content=body, headers={"content-type": "application/json"}, timeout=60
    )


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"messages": MSG, "temperature": "hot"}, "temperature", "number"),
        ({"messages": MSG, "temperature": -1}, "temperature", ">= 0"),
        ({"messages": MSG, "top_p": 2}, "top_p", "top_p"),
        ({"messages": MSG, "n": 0}, "n", "greater than or equal to 1"),
        ({"messages": MSG, "max_tokens": -5}, "max_tokens", "greater than or equal to 0"),
        ({"messages": MSG, "min_tokens": 9, "max_tokens": 2}, "min_tokens", "min_tokens"),
        ({"messages": MSG, "top_logprobs": 50, "logprobs": True}, "top_logprobs", "20"),
        ({"messages": MSG, "presence_penalty": 5}, "presence_penalty", "[-2, 2]"),
        ({"messages": MSG, "logit_bias": {"abc": 1}}, "logit_bias", "token id"),
        ({"messages": MSG, "logit_bias": {"99999999": 1}}, "logit_bias", "vocabulary"),
        ({"messages": MSG, "stop_token_ids": [-1]}, "stop_token_ids", "token ids"),
        ({"messages": MSG, "temprature": 0.5}, "temprature", "not permitted"),
        ({"messages": []}, "messages", "at least 1"),
        ({"temperature": 0}, "messages", "required"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "user"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0]",
            "image_url",
        ),
        (
            {
                "messages": MSG,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x"}},
            },
            "response_format",
            "schema",
        ),
        ({"messages": MSG, "stream": "yes please"}, "stream", "boolean"),
        ({"messages": MSG, "seed": "x"}, "seed", "integer"),
        # integers the engine's tensors cannot hold (top_k 1e30 used to kill the engine)
        ({"messages": MSG, "top_k": 10**30}, "top_k", "out of range"),
        ({"messages": MSG, "min_tokens": 10**30}, "min_tokens", "out of range"),
        ({"messages": MSG, "stop_token_ids": [10**30]}, "stop_token_ids", "token ids"),
        ({"messages": MSG, "logit_bias": {str(10**30): 1}}, "logit_bias", "out of range"),
        ({"messages": MSG, "seed": 10**30}, "seed", "out of range"),
        ({"messages": MSG, "n": 10**30}, "n", "128"),
        ({"messages": MSG, "top_logprobs": 10**30, "logprobs": True}, "top_logprobs", "20"),
        ({"messages": MSG, "stop": ["x"] * 17}, "stop", "at most 16"),
        ({"messages": MSG, "stop": "x" * 1025}, "stop", "1024"),
        ({"messages": MSG, "stop": ""}, "stop", "non-empty"),
        ({"messages": MSG * 4097}, "messages", "4096"),
        ({"messages": [{"role": "user", "content": "a\ud800"}]}, "messages[0].content", "Unicode"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
            "messages[0].content[0]",
            "Unicode",
        ),
        ({"messages": MSG, "timeout": 0}, "timeout", "greater than 0"),
        ({"messages": MSG, "timeout": "soon"}, "timeout", "number"),
    ],
)
def test_chat_field_errors(api_server, body, param, words):
    r = post(api_server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"
    assert param.split("[")[0] in err["message"] and words in err["message"]


def test_nan_and_broken_json(api_server):
    r = post(
        api_server,
        "/v1/chat/completions",
        '{"messages": [{"role":"user","content":"x"}], "temperature": NaN}',
    )
    assert r.status_code == 400 and error_of(r)["param"] == "temperature"
    r = post(api_server, "/v1/chat/completions", '{"messages": [')
    assert r.status_code == 400 and "JSON" in error_of(r)["message"]
    r = post(api_server, "/v1/chat/completions", b"\xff\xfe not utf-8")
    assert r.status_code == 400
    error_of(r)
    body = '{"messages": [{"role":"user","content":"x"}], "max_tokens": Infinity}'
    r = post(api_server, "/v1/chat/completions", body)
    assert r.status_code == 400 and error_of(r)["param"] == "max_tokens"
    body = '{"text": "x", "sampling_params": {"temperature": -Infinity}}'
    r = post(api_server, "/generate", body)
    assert r.status_code == 400 and error_of(r)["param"] == "temperature"
    # a lone surrogate in a field that is only echoed back: a 404 quoting it, not a 500
    r = post(
        api_server,
        "/v1/chat/completions",
        '{"model": "\\ud800", "messages": [{"role":"user","content":"x"}]}',
    )
    assert r.status_code == 404
    error_of(r)


def test_completion_errors(api_server):
    cases = [
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [999999999]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": [10**30]}, "prompt"),
        ({"prompt": [[1], []]}, "prompt"),
        ({"prompt": "\ud800"}, "prompt"),
        ({"prompt": ["a"] * 2049}, "prompt"),  # more than 2048 sequences
        ({"prompt": ["a"] * 20, "n": 128}, "n"),
        ({"prompt": "hi", "suffix": "x"}, "suffix"),
        ({"prompt": "hi", "best_of": 3}, "best_of"),
        ({"prompt": "hi", "logprobs": 1, "priority": 1}, "priority"),  # no priority scheduling
    ]
    for body, param in cases:
        r = post(api_server, "/v1/completions", body)
        assert r.status_code == 400, (body, r.text)
        assert error_of(r)["param"] == param, (body, r.text)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"text": "hi", "sampling_params": {"top_k": 10**30}}, "top_k"),
        ({"text": "hi", "sampling_params": {"max_new_tokens": 10**30}}, "max_new_tokens"),
        ({"text": "hi", "sampling_params": {"n": 1.5}}, "n"),
        ({"text": "hi", "sampling_params": {"ignore_eos": "yes"}}, "ignore_eos"),
        ({"text": "hi", "sampling_params": {"stop": [1]}}, "stop"),
        ({"text": "hi", "sampling_params": {"temperature": [1]}}, "temperature"),
        ({"text": "hi", "sampling_params": {"colour": 1}}, "sampling_params"),
        ({"text": ""}, "text"),
        ({"text": []}, "text"),
        ({"text": "\ud800"}, "text"),
        ({"input_ids": []}, "input_ids"),
        ({"input_ids": [49152]}, "input_ids"),
        ({"input_ids": [[1]] * 2049}, "input_ids"),
        ({"text": "hi", "top_logprobs_num": 10**30}, "top_logprobs_num"),
        ({"text": "hi", "timeout": -1}, "timeout"),
    ],
)
def test_generate_field_errors(api_server, body, param):
    r = post(api_server, "/generate", body)
    assert r.status_code == 400, r.text
    assert error_of(r)["param"] == param, r.text


def test_bad_input_leaves_other_requests_alone(api_server):
    """A stream runs while every kind of bad request arrives; it ends exactly as it does
    alone, and the server stays healthy."""
    body = {"prompt": "The history of Rome", "max_tokens": 24, "temperature": 0}
    alone = post(api_server, "/v1/completions", body).json()["choices"][0]["text"]
    bad = [
        ("/v1/chat/completions", {"messages": MSG, "top_k": 10**30, "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": MSG * 5000}),
        ("/v1/chat/completions", '{"messages": [{"role":"user","content":"x"}], "top_p": NaN}'),
        ("/v1/chat/completions", b"\xff\xfe\x00"),
        ("/v1/completions", {"prompt": "\ud800"}),
        ("/v1/completions", {"prompt": [10**30]}),
        ("/generate", {"text": "hi", "sampling_params": {"stop_token_ids": [2**70]}}),
        ("/generate", {"input_ids": [[1]] * 3000}),
    ]
    with httpx.stream(
        "POST", api_server.url + "/v1/completions", json={**body, "stream": True}, timeout=120
    ) as r:
        lines = (json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {"))
        events = [next(lines)]  # the stream runs
        for path, b in bad:
            assert post(api_server, path, b).status_code == 400, (path, b)
        events += list(lines)
    assert "".join(e["choices"][0]["text"] for e in events) == alone
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert httpx.get(api_server.url + "/health").status_code == 200


def test_context_length_errors_name_both_numbers(api_server):
    long_prompt = "hello " * 9000
    r = post(api_server, "/v1/completions", {"prompt": long_prompt, "max_tokens": 1})
    err = error_of(r)
    assert r.status_code == 400 and "8192" in err["message"] and "9001" in err["message"]
    r = post(api_server, "/v1/chat/completions", {"messages": MSG, "max_tokens": 9000})
    err = error_of(r)
    assert r.status_code == 400 and err["param"] == "max_tokens"
    assert "8192" in err["message"] and "9000 in the completion" in err["message"]


def test_not_found_and_wrong_mode(api_server):
    r = httpx.get(api_server.url + "/v2/nothing")
    assert r.status_code == 404 and error_of(r)["type"] == "not_found_error"
    r = post(api_server, "/v1/chat/completions", {"model": "nope", "messages": MSG})
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    r = post(api_server, "/v1/embeddings", {"input": "hello"})
    assert r.status_code == 400 and "--is-embedding" in error_of(r)["message"]
    r = httpx.get(api_server.url + "/v1/chat/completions")
    assert r.status_code == 405
    error_of(r)


def test_body_too_large_is_413(api_server):
    big = b'{"prompt": "' + b"a" * (17 * 1024 * 1024) + b'"}'
    r = post(api_server, "/v1/completions", big)
    assert r.status_code == 413
    assert "limit" in error_of(r)["message"]


def test_openai_client_sees_bad_request(api_server):
    client = openai.OpenAI(base_url=api_server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=None, messages=MSG, temperature=-3)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"


def test_server_healthy_after_errors(api_server):
    assert httpx.get(api_server.url + "/health").status_code == 200
    r = post(api_server, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
