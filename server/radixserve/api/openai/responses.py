"""/v1/responses: OpenAI's Responses API on the chat path.

A request becomes a chat request: `instructions` the system message, `input` (text or
items: messages, function calls and their outputs) the conversation after the one that
`previous_response_id` ended, `tools`/`tool_choice`/`text.format` their chat forms. The
output's segments (segments.py) become output items: reasoning (with --reasoning-parser),
message, function_call. Responses with `store: true` (the default) are kept in the bounded
in-memory store (store.py) for follow-ups, GET and cancel; `background: true` runs one
after the POST returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

from radixserve.api.errors import APIError, bad_request
from radixserve.api.openai.chat import ToolMode, chat_job, chat_request
from radixserve.api.openai.common import open_generation
from radixserve.api.protocol import ChatCompletionRequest
from radixserve.api.segments import Call, Close, Delta, Op, Open, Segments, whole
from radixserve.api.serving import Final, Formatter, Sequences, collect, serve, start_sequences
from radixserve.api.state import ServerState, get_state
from radixserve.api.store import StoredResponse
from radixserve.engine.client import EngineError, GenerateChunk
from radixserve.engine.io_struct import FinishAbort, FinishLength

router = APIRouter()


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str | list[dict[str, Any]]
    model: str | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None  # accepted; reasoning is the model's own
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: FiniteFloat | None = None
    top_p: FiniteFloat | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    background: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    include: list[str] | None = None
    truncation: str | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # vLLM's extensions, as on chat and completions (see docs/api.md)
    priority: int = 0
    cache_salt: str | None = None


# ---- request -> chat ----------------------------------------------------------------------------
_TEXT_PARTS = ("input_text", "output_text", "text")


def _content_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{param}: text or a list of text parts is required", param)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise bad_request(
                f"{param}[{j}]: only text parts are supported, got {kind!r}", f"{param}[{j}]"
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _field(item: dict, key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad_request(f"{param}.{key}: a string is required", f"{param}.{key}")
    return value


def input_messages(value: str | list[dict]) -> list[dict]:
    """`input` as chat messages; a function call joins the assistant message before it."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    out: list[dict] = []
    for i, item in enumerate(value):
        param = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad_request(
                    f"{param}.role: {role!r} is not user, system, developer or assistant",
                    f"{param}.role",
                )
            text = _content_text(item.get("content"), f"{param}.content")
            out.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "function_call":
            call = {
                "id": _field(item, "call_id", param),
                "type": "function",
                "function": {
                    "name": _field(item, "name", param),
                    "arguments": _field(item, "arguments", param),
                },
            }
            if not out or out[-1]["role"] != "assistant":
                out.append({"role": "assistant", "content": ""})
            out[-1].setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            output = _content_text(item.get("output"), f"{param}.output")
            out.append(
                {"role": "tool", "tool_call_id": _field(item, "call_id", param), "content": output}
            )
        elif kind == "reasoning":
            continue  # earlier reasoning is not shown to the model again
        else:
            raise bad_request(f"{param}.type: {kind!r} items are not supported", f"{param}.type")
    return out


def _chat_tools(tools: list[dict] | None) -> list[dict] | None:
    out = []
    for i, t in enumerate(tools or []):
        if t.get("type") != "function" or not isinstance(t.get("name"), str):
            raise bad_request(
                f"tools[{i}]: only function tools (with a name) are supported", f"tools[{i}]"
            )
        fn = {"name": t["name"], "description": t.get("description") or ""}
        fn["parameters"] = t.get("parameters") or {"type": "object", "properties": {}}
        out.append({"type": "function", "function": fn})
    return out or None


def _chat_tool_choice(choice: str | dict | None) -> str | dict | None:
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise bad_request("tool_choice: a function choice needs a name", "tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: dict | None) -> dict | None:
    fmt = (text or {}).get("format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema")},
        }
    raise bad_request("text.format.type: must be text, json_object or json_schema", "text.format")


def as_chat(req: ResponsesRequest, history: list[dict], rid: str) -> ChatCompletionRequest:
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    return chat_request(
        "input",
        messages=system + history,
        model=req.model,
        tools=_chat_tools(req.tools),
        tool_choice=_chat_tool_choice(req.tool_choice),
        parallel_tool_calls=req.parallel_tool_calls,
        response_format=_response_format(req.text),
        max_completion_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stream=req.stream,
        rid=rid,
        priority=req.priority,
        cache_salt=req.cache_salt,
    )


# ---- the response object ------------------------------------------------------------------------
def _usage(chunk: GenerateChunk | None) -> dict | None:
    if chunk is None:
        return None
    return {
        "input_tokens": chunk.prompt_tokens,
        "input_tokens_details": {"cached_tokens": chunk.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": chunk.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
    }


class ResponseBuilder(Formatter):
    """Output items from the output's segments, the response object around them, and its
    stream of typed events (each with its sequence_number)."""

    done = None  # the SDK ends at response.completed; no [DONE]

    def __init__(
        self, state: ServerState, req: ResponsesRequest, model: str, tools: ToolMode, rid: str
    ) -> None:
        self.state, self.req, self.model, self.tools = state, req, model, tools
        self.id = f"resp_{rid}"
        self.rid = rid
        self.created = time.time()
        self.segments = Segments(tools)
        self.items: dict[int, dict] = {}
        self.seq = 0
        self.cancelled = False
        self.final: dict | None = None
        self.conversation: list[dict] = []  # this turn's input; the output is added at the end

    # the object -----------------------------------------------------------------------------
    def body(self, status: str, chunk: GenerateChunk | None = None, **extra) -> dict:
        req = self.req
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": [self.items[i] for i in sorted(self.items)],
            "instructions": req.instructions,
            "tools": req.tools or [],
            "tool_choice": req.tool_choice or ("auto" if req.tools else "none"),
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "text": req.text or {"format": {"type": "text"}},
            "reasoning": req.reasoning,
            "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "previous_response_id": req.previous_response_id,
            "store": req.store,
            "background": req.background,
            "metadata": req.metadata or {},
            "user": req.user,
            "truncation": "disabled",
            "usage": _usage(chunk),
            "error": None,
            "incomplete_details": None,
            **extra,
        }

    def finish(self, chunk: GenerateChunk) -> dict:
        """The final response object from the last chunk, remembered (and stored)."""
        fr = chunk.finish_reason
        if isinstance(fr, FinishAbort):
            if self.cancelled:
                final = self.body("cancelled", chunk)
            else:
                final = self.body(
                    "failed", chunk, error={"code": "server_error", "message": fr.message}
                )
        elif isinstance(fr, FinishLength):
            final = self.body(
                "incomplete", chunk, incomplete_details={"reason": "max_output_tokens"}
            )
        else:
            final = self.body("completed", chunk, completed_at=time.time())
        self.final = final
        self.keep(final)
        return final

    def keep(self, body: dict) -> None:
        if not self.req.store:
            return
        stored = self.state.responses.get(self.id) or StoredResponse(body)
        stored.body = body
        stored.conversation = self.conversation + output_messages(body["output"])
        if body["status"] != "in_progress":
            stored.cancel = None
            stored.done.set()
        self.state.responses.put(self.id, stored)

    # items ---------------------------------------------------------------------------------
    def _item_id(self, index: int, prefix: str) -> str:
        return f"{prefix}_{self.rid}_{index}"

    def _item(self, seg: Close | Call, status: str = "completed") -> dict:
        if isinstance(seg, Call):
            return {
                "type": "function_call",
                "id": self._item_id(seg.index, "fc"),
                "call_id": seg.call.id,
                "name": seg.call.name,
                "arguments": seg.call.arguments if status == "completed" else "",
                "status": status,
            }
        done = status == "completed"
        if seg.kind == "reasoning":
            return {
                "type": "reasoning",
                "id": self._item_id(seg.index, "rs"),
                "summary": [],
                "content": [{"type": "reasoning_text", "text": seg.text}] if done else [],
                "status": status,
            }
        return {
            "type": "message",
            "id": self._item_id(seg.index, "msg"),
            "role": "assistant",
            "status": status,
            "content": [_text_part(seg.text)] if done else [],
        }

    # whole response ------------------------------------------------------------------------
    def response(self, seqs: Sequences, finals: list[Final]) -> dict:
        chunk = finals[0].chunk
        for seg in whole(self.tools, chunk.text):
            self.items[seg.index] = self._item(seg)
        return self.finish(chunk)

    # stream --------------------------------------------------------------------------------
    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def opening(self, seqs: Sequences) -> list[dict]:
        start = self.body("in_progress")
        self.keep(start)
        return [
            self._event("response.created", response=start),
            self._event("response.in_progress", response=start),
        ]

    def event(self, seqs: Sequences, chunk: GenerateChunk) -> list[dict]:
        finished = chunk.finish_reason is not None
        events = [e for op in self.segments.advance(chunk.text, finished) for e in self._op(op)]
        if finished:
            final = self.finish(chunk)
            kind = {"completed": "response.completed", "incomplete": "response.incomplete"}
            events.append(self._event(kind.get(final["status"], "response.failed"), response=final))
        return events

    def _op(self, op: Op) -> list[dict]:
        if isinstance(op, Open):
            seg = Close(op.kind, op.index, "")
            item = self._item(seg, "in_progress")
            part = _text_part("") if op.kind == "text" else {"type": "reasoning_text", "text": ""}
            return [
                self._event("response.output_item.added", output_index=op.index, item=item),
                self._event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=op.index,
                    content_index=0,
                    part=part,
                ),
            ]
        if isinstance(op, Delta):
            where = self._where(op.index, op.kind)
            if op.kind == "reasoning":
                return [self._event("response.reasoning_text.delta", **where, delta=op.text)]
            return [self._event("response.output_text.delta", **where, delta=op.text, logprobs=[])]
        if isinstance(op, Close):
            item = self.items[op.index] = self._item(op)
            where = self._where(op.index, op.kind)
            if op.kind == "reasoning":
                done = self._event("response.reasoning_text.done", **where, text=op.text)
            else:
                done = self._event("response.output_text.done", **where, text=op.text, logprobs=[])
            return [
                done,
                self._event("response.content_part.done", **where, part=item["content"][0]),
                self._event("response.output_item.done", output_index=op.index, item=item),
            ]
        item = self.items[op.index] = self._item(op)
        where = {"item_id": item["id"], "output_index": op.index}
        return [
            self._event(
                "response.output_item.added",
                output_index=op.index,
                item=self._item(op, "in_progress"),
            ),
            self._event("response.function_call_arguments.delta", **where, delta=item["arguments"]),
            self._event(
                "response.function_call_arguments.done",
                **where,
                name=item["name"],
                arguments=item["arguments"],
            ),
            self._event("response.output_item.done", output_index=op.index, item=item),
        ]

    def _where(self, index: int, kind: str) -> dict:
        prefix = "rs" if kind == "reasoning" else "msg"
        return {"item_id": self._item_id(index, prefix), "output_index": index, "content_index": 0}

    def frame(self, event: dict) -> str:
        return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

    def error_frame(self, e: Exception) -> str:
        status, message = (e.status, e.message) if isinstance(e, APIError) else (503, str(e))
        failed = self.body("failed", error={"code": "server_error", "message": message})
        self.final = failed
        self.keep(failed)
        event = self._event("error", code=str(status), message=message, param=None)
        return self.frame(event) + self.frame(self._event("response.failed", response=failed))

    def end(self) -> None:
        """A stream that ended without its final object (the client left) is cancelled."""
        if self.final is None:
            self.keep(self.body("cancelled"))


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def output_messages(output: list[dict]) -> list[dict]:
    """A response's output items as the chat messages a follow-up continues from."""
    text = "".join(
        p["text"] for item in output if item["type"] == "message" for p in item["content"]
    )
    calls = [
        {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        for item in output
        if item["type"] == "function_call"
    ]
    if not output:
        return []
    message: dict = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = calls
    return [message]


# ---- routes -------------------------------------------------------------------------------------
def _stored(state: ServerState, response_id: str) -> StoredResponse:
    stored = state.responses.get(response_id)
    if stored is None:
        raise APIError(
            404,
            f"Response with id '{response_id}' not found (responses are kept in memory, the "
            f"last {state.args.responses_store_size}, and only with store: true).",
            param="response_id",
            code="response_not_found",
        )
    return stored


@router.post("/v1/responses")
async def create_response(req: ResponsesRequest, request: Request):
    state = get_state(request)
    history: list[dict] = []
    if req.previous_response_id is not None:
        previous = state.responses.get(req.previous_response_id)
        if previous is None:
            raise APIError(
                404,
                f"previous_response_id: response '{req.previous_response_id}' not found "
                "(kept only with store: true, in this server's memory, the last "
                f"{state.args.responses_store_size})",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        if previous.body["status"] == "in_progress":
            raise bad_request(
                "previous_response_id: that response is still in progress", "previous_response_id"
            )
        history = list(previous.conversation)
    if req.background and not req.store:
        raise bad_request("background: needs store: true", "background")
    if req.background and req.stream:
        raise bad_request("background: streaming a background response is not supported", "stream")
    new = input_messages(req.input)
    rid = uuid.uuid4().hex
    chat = as_chat(req, history + new, rid)
    model, lora = open_generation(state, chat)
    tools = ToolMode.of(state, chat)
    job = await chat_job(state, chat, tools, route="/v1/responses")
    job.loras = [lora]
    builder = ResponseBuilder(state, req, model, tools, rid)
    builder.conversation = history + new
    if req.stream and req.store:
        builder.keep(builder.body("in_progress"))
        state.responses.get(builder.id).cancel = lambda: _cancel_stream(state, builder)
    if req.background:
        return await _background(state, job, builder)
    return await serve(request, state, job, builder)


def _cancel_stream(state: ServerState, builder: ResponseBuilder) -> None:
    builder.cancelled = True
    state.client.abort(builder.rid)


async def _background(state: ServerState, job, builder: ResponseBuilder) -> dict:
    """Start the sequences, answer at once with the queued response; a task collects the
    output into the store, or marks it cancelled."""
    seqs = await start_sequences(state, job)
    queued = builder.body("queued")
    builder.keep(queued)

    async def run() -> None:
        builder.keep(builder.body("in_progress"))
        try:
            finals = await collect(seqs)
            builder.response(seqs, finals)
        except asyncio.CancelledError:
            builder.cancelled = True
            builder.keep(builder.body("cancelled"))
        except (APIError, EngineError) as e:
            message = e.message if isinstance(e, APIError) else str(e)
            builder.keep(builder.body("failed", error={"code": "server_error", "message": message}))
        finally:
            await seqs.aclose()

    task = asyncio.create_task(run())
    state.responses.get(builder.id).cancel = task.cancel
    return queued


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request) -> dict:
    return _stored(get_state(request), response_id).body


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(response_id: str, request: Request) -> dict:
    """Cancel a background or streaming response that still runs; its final object back."""
    stored = _stored(get_state(request), response_id)
    if stored.cancel is None:
        raise bad_request(
            f"Response '{response_id}' is {stored.body['status']}: only a background or "
            "streaming response that is still running can be cancelled",
            "response_id",
        )
    stored.cancel()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stored.done.wait(), 30)
    return stored.body


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> dict:
    state = get_state(request)
    stored = _stored(state, response_id)
    if stored.cancel is not None:
        stored.cancel()
    state.responses.delete(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}
