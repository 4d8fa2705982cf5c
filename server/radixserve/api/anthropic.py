"""Anthropic's Messages API: /v1/messages and /v1/messages/count_tokens.

A Messages request becomes a chat request (system, text, tool_use and tool_result blocks
become chat messages; tools and tool_choice their OpenAI forms) and runs the chat path; the
output's segments (segments.py) become content blocks: thinking, text, tool_use. Errors
leave in Anthropic's shape (errors.error_body_for), streams as its named SSE events.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

from radixserve.api.errors import APIError, anthropic_error_body, bad_request
from radixserve.api.openai.chat import ToolMode, chat_job, chat_request
from radixserve.api.openai.common import open_generation
from radixserve.api.protocol import MAX_MESSAGES, ChatCompletionRequest
from radixserve.api.segments import Call, Close, Delta, Op, Open, Segments, whole
from radixserve.api.serving import Final, Formatter, Sequences, serve
from radixserve.api.state import get_state
from radixserve.api.tools import ToolCall
from radixserve.engine.client import GenerateChunk
from radixserve.engine.io_struct import FinishLength, FinishStop

router = APIRouter()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MessageParam(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class ToolParam(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control, type, ... are accepted
    name: str
    description: str | None = None
    input_schema: dict[str, Any]


class CountTokensRequest(_Strict):
    model: str
    messages: list[MessageParam] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | list[dict[str, Any]] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None  # accepted; a model thinks as its template says


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    # newer SDKs send these only through extra_body; the server still honours them
    temperature: FiniteFloat | None = None
    top_p: FiniteFloat | None = None
    top_k: int | None = None
    output_config: dict[str, Any] | None = None  # its `format` (json_schema) is enforced
    # radixserve's (vLLM's) scheduling fields, through extra_body; see docs/api.md
    priority: int = 0
    cache_salt: str | None = None
    # accepted and ignored: they steer Anthropic's own service
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    cache_control: dict[str, Any] | None = None
    container: Any = None
    diagnostics: Any = None
    inference_geo: str | None = None
    speed: str | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None


# ---- request -> chat ----------------------------------------------------------------------------
def _text_of(content: str | list, param: str) -> str:
    """A tool_result's or system's content: a string or text blocks."""
    if isinstance(content, str):
        return content
    texts = []
    for j, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise bad_request(f"{param}[{j}]: only text blocks are supported, got {kind!r}", param)
        texts.append(_str(block, "text", f"{param}[{j}]"))
    return "\n".join(texts)


def _str(block: dict, key: str, param: str) -> str:
    value = block.get(key)
    if not isinstance(value, str):
        raise bad_request(f"{param}.{key}: a string is required", f"{param}.{key}")
    return value


def _chat_messages(req: CountTokensRequest) -> list[dict]:
    """The conversation as chat messages: tool results become `tool` messages (before the
    user's text of the same turn), tool_use blocks the assistant's tool_calls."""
    out: list[dict] = []
    if req.system is not None:
        out.append({"role": "system", "content": _text_of(req.system, "system")})
    for i, m in enumerate(req.messages):
        blocks = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else m.content
        texts, calls = [], []
        for j, block in enumerate(blocks):
            param = f"messages[{i}].content[{j}]"
            kind = block.get("type")
            if kind == "text":
                texts.append(_str(block, "text", param))
            elif kind == "tool_use" and m.role == "assistant":
                args = block.get("input", {})
                calls.append(
                    {
                        "id": _str(block, "id", param),
                        "type": "function",
                        "function": {
                            "name": _str(block, "name", param),
                            "arguments": json.dumps(args, ensure_ascii=False),
                        },
                    }
                )
            elif kind == "tool_result" and m.role == "user":
                content = block.get("content", "")
                out.append(
                    {
                        "role": "tool",
                        "tool_call_id": _str(block, "tool_use_id", param),
                        "content": _text_of(content, f"{param}.content"),
                    }
                )
            elif kind in ("thinking", "redacted_thinking") and m.role == "assistant":
                continue  # earlier turns' reasoning is not shown to the model again
            else:
                raise bad_request(
                    f"{param}: a {m.role} message cannot hold a {kind!r} block here", param
                )
        if texts or calls or not blocks:
            msg: dict = {"role": m.role, "content": "\n".join(texts)}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    return out


def _tool_choice(choice: dict | None) -> tuple[str | dict | None, bool | None]:
    """Anthropic's tool_choice as OpenAI's, and parallel_tool_calls."""
    if choice is None:
        return None, None
    kind = choice.get("type")
    parallel = False if choice.get("disable_parallel_tool_use") else None
    if kind in ("auto", "none"):
        return kind, parallel
    if kind == "any":
        return "required", parallel
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    raise bad_request(
        "tool_choice: type must be auto, any, tool (with a name) or none", "tool_choice"
    )


def _response_format(config: dict | None) -> dict | None:
    """output_config.format ({"type": "json_schema", "schema": ...}) as a response_format."""
    fmt = (config or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise bad_request("output_config.format: type must be json_schema", "output_config")
    return {"type": "json_schema", "json_schema": {"schema": fmt.get("schema")}}


def as_chat(req: CountTokensRequest) -> ChatCompletionRequest:
    """The chat request that runs this Messages (or count_tokens) request."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description or "",
                "parameters": t.input_schema,
            },
        }
        for t in req.tools or []
    ] or None
    choice, parallel = _tool_choice(req.tool_choice)
    fields: dict[str, Any] = {}
    if isinstance(req, MessagesRequest):
        fields = dict(
            max_tokens=req.max_tokens,
            stop=req.stop_sequences,
            stream=req.stream,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            response_format=_response_format(req.output_config),
            priority=req.priority,
            cache_salt=req.cache_salt,
        )
    return chat_request(
        "messages",
        messages=_chat_messages(req),
        model=req.model,
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=parallel,
        **fields,
    )


# ---- routes -------------------------------------------------------------------------------------
@router.post("/v1/messages")
async def messages(req: MessagesRequest, request: Request):
    state = get_state(request)
    chat = as_chat(req)
    model, lora = open_generation(state, chat)
    tools = ToolMode.of(state, chat)
    job = await chat_job(state, chat, tools, route="/v1/messages")
    job.loras = [lora]
    fmt = MessagesFormatter(model, tools, req.stop_sequences or [], len(job.prompts[0]))
    return await serve(request, state, job, fmt)


@router.post("/v1/messages/count_tokens")
async def count_tokens(req: CountTokensRequest, request: Request) -> dict:
    """The prompt's tokens as the model would see it: template, system and tools included."""
    state = get_state(request)
    chat = as_chat(req)
    open_generation(state, chat)
    job = await chat_job(state, chat, ToolMode.of(state, chat), route="/v1/messages")
    return {"input_tokens": len(job.prompts[0])}


# ---- response -----------------------------------------------------------------------------------
def _tool_use(call: ToolCall) -> dict:
    try:
        args = json.loads(call.arguments)
    except json.JSONDecodeError:
        args = {}
    return {
        "type": "tool_use",
        "id": "toolu_" + call.id.removeprefix("call_"),
        "name": call.name,
        "input": args,
    }


def _empty_block(kind: str) -> dict:
    if kind == "reasoning":
        return {"type": "thinking", "thinking": "", "signature": ""}
    return {"type": "text", "text": ""}


def _block(seg: Close) -> dict:
    if seg.kind == "reasoning":
        return {"type": "thinking", "thinking": seg.text, "signature": ""}
    return {"type": "text", "text": seg.text}


class MessagesFormatter(Formatter):
    """Content blocks from the output's segments; stop_reason from the finish and calls."""

    done = None  # Anthropic's streams end with message_stop, no [DONE]

    def __init__(
        self, model: str, tools: ToolMode, stop_sequences: list[str], prompt_tokens: int
    ) -> None:
        self.model = model
        self.tools = tools
        self.stop_sequences = stop_sequences
        self.prompt_tokens = prompt_tokens
        self.segments = Segments(tools)
        self.called = False

    def _stop(self, chunk: GenerateChunk, called: bool) -> tuple[str, str | None]:
        fr = chunk.finish_reason
        if called:
            return "tool_use", None
        if isinstance(fr, FinishLength):
            return "max_tokens", None
        if isinstance(fr, FinishStop) and fr.matched in self.stop_sequences:
            return "stop_sequence", fr.matched
        return "end_turn", None

    def _usage(self, chunk: GenerateChunk) -> dict:
        return {
            "input_tokens": chunk.prompt_tokens,
            "output_tokens": chunk.completion_tokens,
            "cache_read_input_tokens": chunk.cached_tokens,
            "cache_creation_input_tokens": 0,
        }

    def response(self, seqs: Sequences, finals: list[Final]) -> dict:
        chunk = finals[0].chunk
        segs = whole(self.tools, chunk.text)
        content = [_tool_use(s.call) if isinstance(s, Call) else _block(s) for s in segs]
        reason, sequence = self._stop(chunk, any(isinstance(s, Call) for s in segs))
        return {
            "id": f"msg_{seqs.rid}",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": self._usage(chunk),
        }

    def opening(self, seqs: Sequences) -> list[dict]:
        message = {
            "id": f"msg_{seqs.rid}",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0},
        }
        return [{"type": "message_start", "message": message}, {"type": "ping"}]

    def event(self, seqs: Sequences, chunk: GenerateChunk) -> list[dict]:
        finished = chunk.finish_reason is not None
        events = [e for op in self.segments.advance(chunk.text, finished) for e in self._op(op)]
        if finished:
            reason, sequence = self._stop(chunk, self.called)
            events.append(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": reason, "stop_sequence": sequence},
                    "usage": self._usage(chunk),
                }
            )
            events.append({"type": "message_stop"})
        return events

    def _op(self, op: Op) -> list[dict]:
        if isinstance(op, Open):
            return [
                {
                    "type": "content_block_start",
                    "index": op.index,
                    "content_block": _empty_block(op.kind),
                }
            ]
        if isinstance(op, Delta):
            delta = (
                {"type": "thinking_delta", "thinking": op.text}
                if op.kind == "reasoning"
                else {"type": "text_delta", "text": op.text}
            )
            return [{"type": "content_block_delta", "index": op.index, "delta": delta}]
        if isinstance(op, Close):
            return [{"type": "content_block_stop", "index": op.index}]
        self.called = True
        block = _tool_use(op.call)
        args = json.dumps(block["input"], ensure_ascii=False)
        return [
            {
                "type": "content_block_start",
                "index": op.index,
                "content_block": {**block, "input": {}},
            },
            {
                "type": "content_block_delta",
                "index": op.index,
                "delta": {"type": "input_json_delta", "partial_json": args},
            },
            {"type": "content_block_stop", "index": op.index},
        ]

    def frame(self, event: dict) -> str:
        return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

    def error_frame(self, e: Exception) -> str:
        if isinstance(e, APIError):
            body = anthropic_error_body(e.status, e.message)
        else:
            body = anthropic_error_body(503, f"engine unavailable: {e}")
        return self.frame(body)
