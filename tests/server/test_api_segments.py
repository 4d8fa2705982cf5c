"""Output segments and the Responses / Messages shapes built from them, on crafted model
text (no engine): reasoning split out with a reasoning parser, text, tool calls, and the
same items whether streamed or whole."""

from __future__ import annotations

import json

from radixserve.api.anthropic import MessagesFormatter
from radixserve.api.openai.chat import ToolMode
from radixserve.api.openai.responses import ResponseBuilder, ResponsesRequest
from radixserve.api.segments import Call, Close, Delta, Open, Segments
from radixserve.api.serving import Final, Sequences
from radixserve.api.store import ResponseStore
from radixserve.api.tools import get_reasoning_parser, required_tool_schema
from radixserve.engine.client import GenerateChunk
from radixserve.engine.io_struct import FinishLength, FinishStop

THINKING = ToolMode(False, None, None, get_reasoning_parser("think"))
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
FORCED = ToolMode(True, required_tool_schema([TOOL], "required"), None, None)


def _chunk(text: str, finish=None) -> GenerateChunk:
    return GenerateChunk("r1", text, "", [], [], 5, 3, 0, finish)


def test_reasoning_then_text_are_two_segments_streamed_or_whole():
    seg = Segments(THINKING)
    ops = seg.advance("<think>plan", False)
    ops += seg.advance("<think>plan more</think>Answer", False)
    ops += seg.advance("<think>plan more</think>Answer.", True)
    assert ops[0] == Open("reasoning", 0)
    assert "".join(o.text for o in ops if isinstance(o, Delta) and o.kind == "reasoning") == (
        "plan more"
    )
    closes = [o for o in ops if isinstance(o, Close)]
    assert closes == [Close("reasoning", 0, "plan more"), Close("text", 1, "Answer.")]


def test_forced_tool_call_is_one_call_segment_and_empty_output_one_text():
    ops = Segments(FORCED).advance('[{"name": "f", "parameters": {"a": 1}}]', True)
    assert len(ops) == 1 and isinstance(ops[0], Call) and ops[0].call.name == "f"
    empty = Segments(THINKING).advance("", True)
    assert empty == [Open("text", 0), Close("text", 0, "")]


class _State:
    responses = ResponseStore(8)


def test_response_items_and_status_from_the_finish():
    req = ResponsesRequest(input="hi", reasoning={"effort": "low"})
    builder = ResponseBuilder(_State(), req, "m", THINKING, "r1")
    seqs = Sequences("r1", [], 1)
    body = builder.response(seqs, [Final(_chunk("<think>why</think>Because.", FinishLength()))])
    assert [o["type"] for o in body["output"]] == ["reasoning", "message"]
    assert body["output"][0]["content"][0]["text"] == "why"
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["usage"]["total_tokens"] == 8
    stored = _State.responses.get(body["id"])
    assert stored.conversation[-1] == {"role": "assistant", "content": "Because."}


def test_streamed_response_events_rebuild_the_whole_one():
    req = ResponsesRequest(input="hi", stream=True)
    seqs = Sequences("r2", [], 1)
    streamed = ResponseBuilder(_State(), req, "m", THINKING, "r2")
    events = streamed.opening(seqs)
    for text, fin in (("<think>a", None), ("<think>ab</think>C", None), ("<think>ab</think>CD", 1)):
        events += streamed.event(seqs, _chunk(text, FinishStop(2) if fin else None))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.completed"
    whole = ResponseBuilder(_State(), req, "m", THINKING, "r2")
    body = whole.response(seqs, [Final(_chunk("<think>ab</think>CD", FinishStop(2)))])
    assert events[-1]["response"]["output"] == body["output"]


def test_messages_blocks_and_stop_reasons():
    fmt = MessagesFormatter("m", FORCED, [], 5)
    seqs = Sequences("r3", [], 1)
    chunk = _chunk('[{"name": "f", "parameters": {"a": 1}}]', FinishStop(2))
    body = fmt.response(seqs, [Final(chunk)])
    assert body["stop_reason"] == "tool_use"
    assert body["content"][0]["type"] == "tool_use" and body["content"][0]["input"] == {"a": 1}
    events = MessagesFormatter("m", FORCED, [], 5).event(seqs, chunk)
    delta = next(e for e in events if e["type"] == "content_block_delta")["delta"]
    assert json.loads(delta["partial_json"]) == {"a": 1}
    thinking = MessagesFormatter("m", THINKING, ["STOP"], 5)
    body = thinking.response(seqs, [Final(_chunk("<think>x</think>y", FinishStop("STOP")))])
    assert [b["type"] for b in body["content"]] == ["thinking", "text"]
    assert body["stop_reason"] == "stop_sequence" and body["stop_sequence"] == "STOP"
