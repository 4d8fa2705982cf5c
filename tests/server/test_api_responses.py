"""OpenAI's Responses API (/v1/responses) through the real `openai` client against the real
server (issue 19, part 1): text and items, a two-turn conversation, streaming with the SDK's
own parsers, a function-call round trip, structured output, background and cancel."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest
from api_harness import Server
from radixserve.api.store import ResponseStore, StoredResponse

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def client(api_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(api_server: Server) -> str:
    return httpx.get(api_server.url + "/v1/models").json()["data"][0]["id"]


def _chat(client, model, messages, max_tokens=24) -> str:
    r = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0
    )
    return r.choices[0].message.content


def test_text_input_matches_chat_and_is_stored(client, model):
    r = client.responses.create(
        model=model,
        instructions="Answer briefly.",
        input="What is the capital of France?",
        max_output_tokens=24,
        temperature=0,
    )
    assert r.id.startswith("resp_") and r.object == "response" and r.model == model
    assert r.status in ("completed", "incomplete") and r.output[0].type == "message"
    system = {"role": "system", "content": "Answer briefly."}
    user = {"role": "user", "content": "What is the capital of France?"}
    assert r.output_text == _chat(client, model, [system, user])
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 24
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    again = client.responses.retrieve(r.id)
    assert again.output_text == r.output_text and again.status == r.status


def test_two_turns_through_previous_response_id(client, model):
    first = client.responses.create(
        model=model, input="My name is Ada. Say hello to me.", max_output_tokens=16, temperature=0
    )
    second = client.responses.create(
        model=model,
        previous_response_id=first.id,
        input=[{"role": "user", "content": "What is my name?"}],
        max_output_tokens=16,
        temperature=0,
    )
    assert second.previous_response_id == first.id
    history = [
        {"role": "user", "content": "My name is Ada. Say hello to me."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]
    assert second.output_text == _chat(client, model, history, 16)
    alone = client.responses.create(
        model=model, input="What is my name?", max_output_tokens=16, temperature=0
    )
    assert second.usage.input_tokens > alone.usage.input_tokens + 10


def test_stream_helper_and_typed_events(client, model):
    kw = dict(model=model, input="What is 2+2?", max_output_tokens=60, temperature=0)
    whole = client.responses.create(**kw)
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert whole.status == "completed"  # the helper's final response needs response.completed
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    for kind in (
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ):
        assert kind in types, kind
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens
    raw = client.responses.create(**kw, stream=True)
    raw_types = [e.type for e in raw]
    assert raw_types == types


def test_function_call_round_trip(client, model):
    r = client.responses.create(
        model=model,
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=80,
        temperature=0,
    )
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    answer = client.responses.create(
        model=model,
        previous_response_id=r.id,
        input=[
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 C, clear"}
        ],
        tools=[WEATHER],
        max_output_tokens=30,
        temperature=0,
    )
    assert answer.output[-1].type == "message" and answer.output_text
    # the same conversation spelled out as items, without the store
    spelled = client.responses.create(
        model=model,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "type": "function_call",
                "call_id": calls[0].call_id,
                "name": "get_weather",
                "arguments": calls[0].arguments,
            },
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 C, clear"},
        ],
        tools=[WEATHER],
        max_output_tokens=30,
        temperature=0,
        store=False,
    )
    assert spelled.output_text == answer.output_text


def test_streamed_function_call(client, model):
    with client.responses.stream(
        model=model,
        input="Weather in Oslo?",
        tools=[WEATHER],
        tool_choice="required",
        max_output_tokens=80,
        temperature=0,
    ) as stream:
        types = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in types
    assert "response.function_call_arguments.done" in types
    call = next(o for o in final.output if o.type == "function_call")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])


def test_text_format_json_schema_and_max_output_tokens(client, model):
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string", "maxLength": 20}},
        "required": ["capital"],
        "additionalProperties": False,
    }
    r = client.responses.create(
        model=model,
        input="What is the capital of France? Answer in JSON.",
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema}},
        max_output_tokens=40,
        temperature=0,
    )
    jsonschema.validate(json.loads(r.output_text), schema)
    short = client.responses.create(
        model=model, input="Tell me a story.", max_output_tokens=3, temperature=0
    )
    assert short.status == "incomplete" and short.usage.output_tokens == 3
    assert short.incomplete_details.reason == "max_output_tokens"


def test_background_runs_and_cancel_stops_it(client, model):
    done = client.responses.create(
        model=model, input="Say hi.", max_output_tokens=8, temperature=0, background=True
    )
    assert done.status == "queued"
    for _ in range(600):
        done = client.responses.retrieve(done.id)
        if done.status not in ("queued", "in_progress"):
            break
        time.sleep(0.1)
    fg = client.responses.create(model=model, input="Say hi.", max_output_tokens=8, temperature=0)
    assert done.output_text == fg.output_text
    long = client.responses.create(
        model=model,
        input="Count from 1 to 1000, separated by commas.",
        max_output_tokens=1500,
        temperature=0,
        background=True,
    )
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(long.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(long.id)  # not running any more


def test_errors(client, model, api_server):
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nope")
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=model, input="hi", previous_response_id="resp_nope")
    unstored = client.responses.create(model=model, input="hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=model, input=[{"type": "web_search_call", "id": "x"}])
    assert e.value.body["param"] == "input[0].type"
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=model, input="hi", tools=[{"type": "web_search"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=model, input=[])  # no conversation at all
    assert e.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError):
        done = client.responses.create(model=model, input="hi", max_output_tokens=4)
        client.responses.cancel(done.id)
    r = httpx.post(api_server.url + "/v1/responses", json={"input": "hi", "nope": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "nope"
    deleted = httpx.delete(api_server.url + f"/v1/responses/{unstored.id}")
    assert deleted.status_code == 404


def test_store_drops_the_least_recently_used() -> None:
    store = ResponseStore(2)
    for rid in ("a", "b"):
        store.put(rid, StoredResponse({"id": rid}))
    assert store.get("a") is not None  # a is now the most recently used
    store.put("c", StoredResponse({"id": "c"}))
    assert store.get("b") is None and store.get("a") and store.get("c") and len(store) == 2
