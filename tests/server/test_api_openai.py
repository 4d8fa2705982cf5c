"""The OpenAI routes through the real `openai` client against the real server."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from api_harness import Server

PARIS = [{"role": "user", "content": "What is the capital of France?"}]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(api_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_models_list_and_retrieve(client, model, api_server):
    models = client.models.list().data
    assert [m.id for m in models] == [model]
    assert model.startswith("SmolLM2-135M-Instruct")
    card = client.models.retrieve(model)
    assert card.id == model and card.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"


def test_chat_greedy_answer(client, model):
    r = client.chat.completions.create(model=model, messages=PARIS, temperature=0)
    assert r.choices[0].message.content == "The capital of France is Paris."
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert isinstance(r.created, int) and r.model == model
    u = r.usage
    assert u.prompt_tokens > 10 and u.completion_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=PARIS, max_tokens=1)
    assert e.value.status_code == 404
    assert "gpt-4o" in e.value.body["message"] and e.value.body["param"] == "model"


def test_stream_equals_non_stream_with_usage(client, model):
    messages = [{"role": "user", "content": "Name three colors."}]
    full = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=24
    )
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == full.choices[0].finish_reason and not any(reasons[:-1])
    # usage arrives last, in a chunk of its own with no choices
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_sse_framing_ends_with_done(api_server):
    body = {"messages": PARIS, "temperature": 0, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", api_server.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


async def test_async_client_streams_completion(api_server, model):
    client = openai.AsyncOpenAI(base_url=api_server.url + "/v1", api_key="x", max_retries=0)
    prompt = "The three primary colors are"
    full = await client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True
    )
    parts = [c.choices[0].text async for c in stream]
    assert "".join(parts) == full.choices[0].text
    assert full.object == "text_completion" and full.id.startswith("cmpl-")
    assert full.usage.completion_tokens == 12 and full.choices[0].finish_reason == "length"
    await client.close()


def test_shared_prefix_reports_cached_tokens(client, model):
    system = "You are a helpful geography assistant. " * 30
    first = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "Hi!"}],
        max_tokens=1,
        temperature=0,
    )
    second = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "Hello?"}],
        max_tokens=1,
        temperature=0,
    )
    assert first.usage.prompt_tokens > 200
    assert second.usage.prompt_tokens_details.cached_tokens >= 200


def test_n2_returns_two_indexed_choices(client, model):
    r = client.chat.completions.create(
        model=model, messages=PARIS, n=2, temperature=0.9, seed=3, max_tokens=6
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.message.content for c in r.choices)
    # the prompt counts once, both completions count
    single = client.chat.completions.create(model=model, messages=PARIS, max_tokens=1)
    assert r.usage.prompt_tokens == single.usage.prompt_tokens
    assert 2 <= r.usage.completion_tokens <= 12  # both choices, at most 6 tokens each
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = client.chat.completions.create(
        model=model, messages=PARIS, n=2, temperature=0, max_tokens=4, stream=True
    )
    texts, reasons = {0: "", 1: ""}, {}
    for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    assert set(reasons) == {0, 1}
    assert texts[0] == texts[1] == "The capital of France is Paris."[: len(texts[0])]


def test_stop_string_ends_generation(client, model):
    r = client.chat.completions.create(model=model, messages=PARIS, temperature=0, stop=["Paris"])
    assert r.choices[0].message.content == "The capital of France is "
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["matched_stop"] == "Paris"


def test_chat_logprobs_shape(client, model):
    r = client.chat.completions.create(
        model=model, messages=PARIS, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and t.bytes == list(t.token.encode())
        assert len(t.top_logprobs) == 3
        lps = [a.logprob for a in t.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert t.top_logprobs[0].token == t.token  # greedy took the most likely token


def test_completion_logprobs_shape(client, model):
    r = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(1 <= len(d) <= 2 for d in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)


def test_seed_reproducible(client, model):
    kw = {"model": model, "messages": PARIS, "temperature": 1.0, "max_tokens": 8}
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    assert a == b


def test_completion_prompt_forms(client, model, api_server):
    ids = httpx.post(api_server.url + "/tokenize", json={"prompt": "The capital of France is"})
    ids = ids.json()["tokens"]
    text = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=4, temperature=0
    ).choices[0]
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == text.text
    many = client.completions.create(model=model, prompt=[ids, ids], max_tokens=4, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == many.choices[1].text == text.text
    echo = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=4, temperature=0, echo=True
    )
    assert echo.choices[0].text == "The capital of France is" + text.text


def test_extras_are_accepted(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "What is the capital of France?"}],
            },
        ],
        temperature=0,
        max_completion_tokens=6,
        extra_body={
            "top_k": 1,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "min_tokens": 6,
            "ignore_eos": True,
            "stop_token_ids": [],
            "skip_special_tokens": True,
            "chat_template_kwargs": {},
        },
        response_format={"type": "text"},
        user="test",
    )
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"


async def test_32_concurrent_streams_match_sequential(api_server, model):
    """Batching changes nothing: every stream equals its prompt's output sent alone."""
    client = openai.AsyncOpenAI(base_url=api_server.url + "/v1", api_key="x", max_retries=0)
    prompts = [f"Write a short sentence about the number {i}." for i in range(4)]

    async def one(prompt: str, stream: bool) -> str:
        kw = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": 8,
        }
        if not stream:
            r = await client.chat.completions.create(**kw)
            return r.choices[0].message.content
        parts = []
        async for c in await client.chat.completions.create(stream=True, **kw):
            if c.choices:
                parts.append(c.choices[0].delta.content or "")
        return "".join(parts)

    alone = [await one(p, stream=False) for p in prompts]
    together = await asyncio.gather(*(one(prompts[i % 4], stream=True) for i in range(32)))
    assert together == [alone[i % 4] for i in range(32)]
    await client.close()
