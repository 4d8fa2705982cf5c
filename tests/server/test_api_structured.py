"""Structured output and tool calling through the real openai client (issue 8)."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from api_harness import Server

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["C", "F"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def client(api_server: Server) -> openai.AsyncOpenAI:  # per test: each test has its own loop
    return openai.AsyncOpenAI(base_url=api_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(api_server: Server) -> str:
    return httpx.get(api_server.url + "/v1/models").json()["data"][0]["id"]


async def test_json_schema_twenty_seeded_sampled_requests_validate(client, model):
    import asyncio

    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }

    async def one(seed: int):
        r = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Invent a person."}],
            temperature=0.8,
            seed=seed,
            max_tokens=120,
            response_format=fmt,
        )
        return r.choices[0]

    choices = await asyncio.gather(*(one(s) for s in range(20)))
    for c in choices:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.message.content), PERSON)
    assert len({c.message.content for c in choices}) > 1


async def test_json_object_and_a_bad_schema(client, model):
    r = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Reply in JSON."}],
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_object"},
    )
    choice = r.choices[0]
    # any object is allowed, so a small model may run past max_tokens; then it is cut JSON
    assert choice.message.content.startswith("{")
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(
            model=model,
            messages=ASK,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
            },
        )
    assert "json_schema" in e.value.body["message"]


def test_native_generate_regex_and_ebnf(api_server: Server):
    with httpx.Client(base_url=api_server.url, timeout=120) as h:
        r = h.post(
            "/generate",
            json={
                "text": "My code is",
                "sampling_params": {
                    "regex": r"[A-Z]{2}[0-9]{3}",
                    "temperature": 0.8,
                    "max_new_tokens": 10,
                },
            },
        )
        assert r.status_code == 200 and re.fullmatch(r"[A-Z]{2}[0-9]{3}", r.json()["text"])
        r = h.post(
            "/generate",
            json={
                "text": "Answer:",
                "sampling_params": {"ebnf": 'root ::= "yes" | "no"', "max_new_tokens": 5},
            },
        )
        assert r.json()["text"] in ("yes", "no")
        r = h.post(
            "/generate", json={"text": "x", "sampling_params": {"regex": "(", "max_new_tokens": 5}}
        )
        assert r.status_code == 400 and "regex" in r.json()["error"]["message"]
        r = h.post(
            "/generate",
            json={"text": "x", "sampling_params": {"regex": "a", "ebnf": 'root ::= "a"'}},
        )
        assert r.status_code == 400


def check_calls(calls) -> dict:
    assert calls and calls[0].type == "function" and calls[0].id
    assert calls[0].function.name == "get_weather"
    args = json.loads(calls[0].function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    return args


async def test_tool_choice_required_returns_valid_calls_then_the_result_completes(client, model):
    r = await client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0.8,
        seed=1,
        max_tokens=80,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    check_calls(choice.message.tool_calls)
    call = choice.message.tool_calls[0]
    follow = ASK + [
        {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
        {
            "role": "tool",
            "tool_call_id": call.id,
            "content": json.dumps({"temperature": 18, "sky": "clear"}),
        },
    ]
    r2 = await client.chat.completions.create(
        model=model, messages=follow, tools=[WEATHER], temperature=0, max_tokens=40
    )
    assert r2.choices[0].finish_reason in ("stop", "length")
    assert r2.choices[0].message.content


async def test_named_tool_choice_streamed(client, model):
    stream = await client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0.8,
        seed=2,
        max_tokens=80,
        stream=True,
    )
    calls, reasons, content = [], [], ""
    async for chunk in stream:
        for c in chunk.choices:
            calls += c.delta.tool_calls or []
            content += c.delta.content or ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert reasons == ["tool_calls"] and content == ""
    assert len(calls) == 1 and calls[0].index == 0
    check_calls(calls)


async def test_tool_choice_errors(client, model):
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model=model,
            messages=ASK,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model=model, messages=ASK, tool_choice="required")
