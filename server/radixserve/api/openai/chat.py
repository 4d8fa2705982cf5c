"""/v1/chat/completions: a conversation through the chat template, tools and reasoning
split out of the text, logprobs per token."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from pydantic import ValidationError

from radixserve.api.errors import APIError, bad_request
from radixserve.api.openai.common import (
    ChoicesFormatter,
    finish_reason,
    finite,
    open_generation,
    params_fields,
)
from radixserve.api.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprob,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaMessage,
)
from radixserve.api.serving import Final, GenerationJob, Sequences, off_loop, serve
from radixserve.api.state import ServerState, get_state
from radixserve.api.tools import (
    ToolCall,
    calls_from_required,
    get_reasoning_parser,
    get_tool_parser,
    required_tool_schema,
)
from radixserve.api.validate import check_prompt, check_text, make_params
from radixserve.engine.client import GenerateChunk

router = APIRouter()


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _logprobs(state: ServerState, lps: list, top_n: int) -> ChatChoiceLogprobs:
    content = []
    for token_id, lp, alts in lps:
        text = state.token_text(token_id)
        top = [
            ChatLogprob(
                token=(t := state.token_text(a)), logprob=finite(alp), bytes=_token_bytes(t)
            )
            for a, alp in alts[:top_n]
        ]
        content.append(
            ChatTokenLogprob(
                token=text, logprob=finite(lp), bytes=_token_bytes(text), top_logprobs=top
            )
        )
    return ChatChoiceLogprobs(content=content)


def _chat_messages(req: ChatCompletionRequest) -> list[dict]:
    messages = []
    for i, m in enumerate(req.messages):
        d = m.model_dump(exclude_none=True)
        if d["role"] == "developer":  # OpenAI's newer name for system
            d["role"] = "system"
        if isinstance(m.content, str):
            check_text(m.content, f"messages[{i}].content")
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                param = f"messages[{i}].content[{j}]"
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"{param}: only text content parts are supported, got {part.type!r}",
                        param,
                    )
                texts.append(check_text(part.text, param))
            d["content"] = "\n".join(texts)
        messages.append(d)
    return messages


def chat_request(param: str, **fields) -> ChatCompletionRequest:
    """The chat request another API's request translates to; what the chat request's
    checks refuse (no messages, a field out of range) is a 400 naming `param`."""
    try:
        return ChatCompletionRequest(**fields)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise bad_request(f"{param}: {where}: {first['msg']}", param) from e


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    state = get_state(request)
    model, lora = open_generation(state, req)
    tools = ToolMode.of(state, req)
    job = await chat_job(state, req, tools)
    job.loras = [lora]
    return await serve(request, state, job, ChatFormatter(state, req, model, tools))


async def chat_job(
    state: ServerState,
    req: ChatCompletionRequest,
    tools: ToolMode,
    route: str = "/v1/chat/completions",
) -> GenerationJob:
    """The request adapter: the conversation through the chat template, checked, with the
    sampling params (a required tool call is a grammar). Responses and Messages requests
    come here too, translated into a chat request (`route` labels their metrics)."""
    kwargs = dict(req.chat_template_kwargs or {})
    if req.tools and tools.render:
        kwargs["tools"] = req.tools
    if req.continue_final_message:
        if req.messages[-1].role != "assistant":
            raise bad_request(
                "continue_final_message: the last message must be the assistant's",
                "continue_final_message",
            )
        kwargs.update(add_generation_prompt=False, continue_final_message=True)
    try:
        ids = await off_loop(state.client.apply_chat_template, _chat_messages(req), **kwargs)
    except APIError:
        raise
    except Exception as e:  # a template rejecting the conversation (roles out of order, ...)
        raise bad_request(f"messages: the chat template failed: {e}", "messages") from e
    max_tokens = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    check_prompt(state.info, ids, "messages", max_tokens=max_tokens, max_param=max_param)
    if max_tokens is None:
        max_tokens = state.info.context_length - len(ids)
    fields = params_fields(req, max_tokens)
    if tools.schema is not None:
        if fields["json_schema"] is not None:
            raise bad_request(
                "response_format: cannot be combined with a required tool call", "response_format"
            )
        fields["json_schema"] = json.dumps(tools.schema)
    params = make_params(fields, state.info, openai_names=True)
    top_n = req.top_logprobs or 0
    if top_n and not req.logprobs:
        raise bad_request("top_logprobs: needs logprobs=true", "top_logprobs")
    return GenerationJob.of(req, route, [ids], [params], req.logprobs, top_n)


class ChatFormatter(ChoicesFormatter):
    """A choice is the assistant's message: content, reasoning and tool calls split out of
    the text; a stream opens with the role and sends the text as deltas."""

    prefix = "chatcmpl"
    response_type = ChatCompletionResponse
    chunk_type = ChatCompletionChunk

    def __init__(
        self, state: ServerState, req: ChatCompletionRequest, model: str, tools: ToolMode
    ) -> None:
        opts = req.stream_options
        super().__init__(state, model, opts, opts is not None and opts.continuous_usage_stats)
        self.tools = tools
        self.want_lp = req.logprobs
        self.top_n = req.top_logprobs or 0
        self.views: dict[int, StreamView] = {}

    def _lps(self, lps: list) -> ChatChoiceLogprobs | None:
        return _logprobs(self.state, lps, self.top_n) if self.want_lp else None

    def choice(self, seqs: Sequences, final: Final) -> ChatChoice:
        reason, matched = finish_reason(final.chunk)
        message = self.tools.message(final.chunk.text)
        return ChatChoice(
            index=final.chunk.index,
            message=message,
            logprobs=self._lps(final.logprobs),
            finish_reason="tool_calls" if message.tool_calls else reason,
            matched_stop=matched,
        )

    def opening(self, seqs: Sequences) -> list[ChatCompletionChunk]:
        super().opening(seqs)
        return [
            ChatCompletionChunk(
                **self.head,
                choices=[
                    ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                ],
            )
            for i in range(len(seqs.streams))
        ]

    def stream_choice(self, seqs: Sequences, c: GenerateChunk) -> ChatStreamChoice | None:
        reason, matched = finish_reason(c)
        view = self.views.setdefault(c.index, StreamView(self.tools))
        delta = view.advance(c.text, reason is not None)
        if delta.tool_calls:
            reason = "tool_calls"
        if delta.content is None and delta.reasoning_content is None and not delta.tool_calls:
            if reason is None and not (self.want_lp and c.logprobs):
                return None
        return ChatStreamChoice(
            index=c.index,
            delta=delta,
            logprobs=self._lps(c.logprobs),
            finish_reason=reason,
            matched_stop=matched,
        )


class ToolMode:
    """How one chat request treats tools and reasoning: whether the template sees the
    tools, the schema a required/named choice enforces, and how text becomes fields."""

    def __init__(self, render: bool, schema: dict | None, parser, reasoning) -> None:
        self.render, self.schema, self.parser, self.reasoning = render, schema, parser, reasoning

    @classmethod
    def of(cls, state: ServerState, req: ChatCompletionRequest) -> ToolMode:
        args = state.args
        reasoning = get_reasoning_parser(args.reasoning_parser) if args.reasoning_parser else None
        choice = (
            req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none")
        )
        if isinstance(choice, str) and choice not in ("none", "auto", "required"):
            raise bad_request(
                f"tool_choice: {choice!r} is not none, auto, required or a function", "tool_choice"
            )
        if choice != "none" and not req.tools:
            raise bad_request("tool_choice: needs tools", "tool_choice")
        if choice == "none":
            return cls(False, None, None, reasoning)
        if choice == "auto":
            parser = get_tool_parser(args.tool_call_parser) if args.tool_call_parser else None
            return cls(True, None, parser, reasoning)
        try:
            schema = required_tool_schema(req.tools, choice, req.parallel_tool_calls is not False)
        except (KeyError, TypeError) as e:
            raise bad_request(
                f"tools: each tool needs a function with a name ({e})", "tools"
            ) from e
        except ValueError as e:
            raise bad_request(str(e), "tool_choice") from e
        return cls(True, schema, None, None)

    def split(self, text: str, finished: bool) -> tuple[str | None, str | None, list[ToolCall]]:
        """(reasoning, content, tool calls) of the text so far."""
        if self.schema is not None:
            if not finished:
                return None, None, []
            try:
                return None, None, calls_from_required(text)
            except (ValueError, KeyError, TypeError):  # cut off by max_tokens: not JSON yet
                return None, text, []
        reasoning = None
        if self.reasoning is not None:
            reasoning, text = self.reasoning.split(text, finished)
        if self.parser is None:
            return reasoning, text, []
        if finished:
            content, calls = self.parser.parse(text)
            return reasoning, content, calls
        return reasoning, self.parser.stream_content(text, False), []

    def message(self, text: str) -> ChatResponseMessage:
        reasoning, content, calls = self.split(text, True)
        return ChatResponseMessage(
            content=content,
            reasoning_content=reasoning,
            tool_calls=[c.to_openai() for c in calls] or None,
        )


class StreamView:
    """Turns a sequence's cumulative text into OpenAI deltas of content, reasoning and,
    at the end, tool calls (each call sent whole, in one delta)."""

    def __init__(self, mode: ToolMode) -> None:
        self.mode = mode
        self.sent_reasoning = 0
        self.sent_content = 0

    def step(self, text: str, finished: bool) -> tuple[str, str, list[ToolCall]]:
        """(new reasoning, new content, tool calls) since the last step; calls at the end."""
        reasoning, content, calls = self.mode.split(text, finished)
        reasoning, content = reasoning or "", content or ""
        d_reason = reasoning[self.sent_reasoning :]
        d_content = content[self.sent_content :]
        self.sent_reasoning, self.sent_content = len(reasoning), len(content)
        return d_reason, d_content, calls

    def advance(self, text: str, finished: bool) -> DeltaMessage:
        d_reason, d_content, calls = self.step(text, finished)
        return DeltaMessage(
            content=d_content or None,
            reasoning_content=d_reason or None,
            tool_calls=[c.to_openai(index=i) for i, c in enumerate(calls)] or None,
        )
