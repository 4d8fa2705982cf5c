"""Tool-call and reasoning parsers on crafted model outputs, finished and streamed."""

from __future__ import annotations

import json

import jsonschema
import pytest
from radixserve.api.tools import (
    calls_from_required,
    get_reasoning_parser,
    get_tool_parser,
    required_tool_schema,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


def test_hermes_parses_calls_and_keeps_leading_content():
    p = get_tool_parser("hermes")
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    content, calls = p.parse(text)
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")


def test_hermes_plain_text_and_broken_json_stay_content():
    p = get_tool_parser("hermes")
    assert p.parse("Paris is sunny.") == ("Paris is sunny.", [])
    assert p.parse("<tool_call>{not json</tool_call>")[1] == []


def test_streaming_never_leaks_a_partial_marker():
    p = get_tool_parser("hermes")
    assert p.stream_content("Hello <tool_", finished=False) == "Hello "
    assert p.stream_content("Hello <tool_call>{", finished=False) == "Hello "
    assert p.stream_content("Hello <b>", finished=False) == "Hello <b>"
    assert p.stream_content("Hello <tool_", finished=True) == "Hello <tool_"


def test_llama3_json_with_tag_and_several_calls():
    p = get_tool_parser("llama3_json")
    content, calls = p.parse(
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", "parameters": {}}'
    )
    assert content is None and [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}
    assert p.parse("Just text.") == ("Just text.", [])


def test_required_schema_accepts_calls_and_rejects_others():
    schema = required_tool_schema([WEATHER, TIME], "required")
    good = [
        {"name": "get_weather", "parameters": {"city": "Rome"}},
        {"name": "get_time", "parameters": {}},
    ]
    jsonschema.validate(good, schema)
    for bad in (
        [],
        [{"name": "nope", "parameters": {}}],
        [{"name": "get_weather", "parameters": {}}],
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    calls = calls_from_required(json.dumps(good))
    assert [c.name for c in calls] == ["get_weather", "get_time"]


def test_named_tool_choice_allows_only_that_function_once():
    schema = required_tool_schema(
        [WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}
    )
    jsonschema.validate([{"name": "get_time", "parameters": {}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_weather", "parameters": {"city": "x"}}], schema)
    with pytest.raises(ValueError, match="not among the tools"):
        required_tool_schema([WEATHER], {"type": "function", "function": {"name": "missing"}})


def test_reasoning_split_finished_and_streamed():
    r = get_reasoning_parser("qwen3")
    assert r.split("<think>\nStep 1.\n</think>\n\nParis.") == ("\nStep 1.\n", "Paris.")
    assert r.split("Paris.") == (None, "Paris.")
    assert r.split("<think>partial</thi", finished=False) == ("partial", "")
    assert r.split("<thi", finished=False) == (None, "")
    r1 = get_reasoning_parser("deepseek-r1")  # the template opened <think> already
    assert r1.split("thinking</think>answer") == ("thinking", "answer")
    with pytest.raises(ValueError, match="reasoning-parser"):
        get_reasoning_parser("bogus")
