"""OpenAI's routes: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models."""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import AsyncIterator

import numpy as np
from fastapi import APIRouter, Request

from radixserve.api.errors import APIError, bad_request
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
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    ResponseFormat,
    SamplingExtras,
    UsageInfo,
)
from radixserve.api.serving import (
    DONE,
    Sequences,
    SSEResponse,
    collect,
    finish_reason,
    off_loop,
    sse,
    sse_error,
    start_sequences,
    until_disconnected,
    usage_of,
)
from radixserve.api.state import ServerState, get_state
from radixserve.api.tools import (
    ToolCall,
    calls_from_required,
    get_reasoning_parser,
    get_tool_parser,
    required_tool_schema,
)
from radixserve.api.validate import as_batch, check_batch, check_prompt, check_text, make_params
from radixserve.engine.client import EngineError, GenerateChunk

router = APIRouter()
_MAX_EMBEDDING_INPUTS = 2048


# ---- models -----------------------------------------------------------------------------------
def _card(state: ServerState) -> ModelCard:
    return ModelCard(
        id=state.model_name,
        created=int(state.started_at),
        root=state.info.model_path,
        max_model_len=state.info.context_length,
    )


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    state = get_state(request)
    state.check_ready()
    return ModelList(data=[_card(state)])


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    state = get_state(request)
    state.check_ready()
    state.check_model(model_id)
    return _card(state)


# ---- shared between chat and completions ----------------------------------------------------------
def _grammar_of(rf: ResponseFormat | None) -> str | None:
    """The JSON schema text the grammar enforces for `response_format` ("{}" = any object)."""
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return "{}"
    spec = rf.json_schema or {}
    schema = spec.get("schema", spec.get("schema_"))
    if not isinstance(schema, dict):
        raise bad_request(
            "response_format.json_schema.schema: a JSON schema object is required",
            "response_format",
        )
    return json.dumps(schema)


def _params_fields(req: ChatCompletionRequest | CompletionRequest, max_tokens: int) -> dict:
    return {
        "max_new_tokens": max_tokens,
        "min_new_tokens": req.min_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "frequency_penalty": req.frequency_penalty,
        "presence_penalty": req.presence_penalty,
        "repetition_penalty": req.repetition_penalty,
        "stop": req.stop,
        "stop_token_ids": req.stop_token_ids,
        "ignore_eos": req.ignore_eos,
        "skip_special_tokens": req.skip_special_tokens,
        "spaces_between_special_tokens": req.spaces_between_special_tokens,
        "n": req.n,
        "seed": req.seed,
        "logit_bias": req.logit_bias,
        "json_schema": _grammar_of(req.response_format),
    }


def _prepare(state: ServerState, req: SamplingExtras) -> str:
    state.check_ready()
    state.check_generation()
    return state.check_model(req.model)


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _chat_logprobs(state: ServerState, lps: list, top_n: int) -> ChatChoiceLogprobs:
    content = []
    for token_id, lp, alts in lps:
        text = state.token_text(token_id)
        top = [
            ChatLogprob(
                token=(t := state.token_text(a)), logprob=_finite(alp), bytes=_token_bytes(t)
            )
            for a, alp in alts[:top_n]
        ]
        content.append(
            ChatTokenLogprob(
                token=text, logprob=_finite(lp), bytes=_token_bytes(text), top_logprobs=top
            )
        )
    return ChatChoiceLogprobs(content=content)


def _finite(lp: float) -> float:
    """-inf (a token the sampler ruled out) as OpenAI's floor, so the JSON stays valid."""
    return lp if math.isfinite(lp) else -9999.0


# ---- chat ---------------------------------------------------------------------------------------
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


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    state = get_state(request)
    model = _prepare(state, req)
    kwargs = dict(req.chat_template_kwargs or {})
    tools = _ToolMode.of(state, req)
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
    fields = _params_fields(req, max_tokens)
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
    seqs = await start_sequences(
        state, [ids], [params], "/v1/chat/completions", req.rid, req.logprobs, top_n, req.timeout
    )
    if req.stream:
        return SSEResponse(_stream_chat(state, req, seqs, model, top_n, tools))
    finals = await until_disconnected(request, collect(seqs))
    choices = []
    for f in finals:
        reason, matched = finish_reason(f.chunk)
        message = tools.message(f.chunk.text)
        if message.tool_calls:
            reason = "tool_calls"
        choices.append(
            ChatChoice(
                index=f.chunk.index,
                message=message,
                logprobs=_chat_logprobs(state, f.logprobs, top_n) if req.logprobs else None,
                finish_reason=reason,
                matched_stop=matched,
            )
        )
    return ChatCompletionResponse(
        id=f"chatcmpl-{seqs.rid}",
        model=model,
        choices=choices,
        usage=UsageInfo(**usage_of([f.chunk for f in finals], seqs.n)),
    )


async def _stream_chat(
    state: ServerState,
    req: ChatCompletionRequest,
    seqs: Sequences,
    model: str,
    top_n: int,
    tools: _ToolMode,
) -> AsyncIterator[str]:
    head = {"id": f"chatcmpl-{seqs.rid}", "created": int(time.time()), "model": model}
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    last: dict[int, GenerateChunk] = {}
    try:
        for i in range(len(seqs.streams)):
            role = ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
            yield sse(ChatCompletionChunk(**head, choices=[role]))
        views: dict[int, _StreamView] = {}
        async for c in seqs.merged():
            last[c.index] = c
            reason, matched = finish_reason(c)
            delta = views.setdefault(c.index, _StreamView(tools)).advance(
                c.text, reason is not None
            )
            if delta.tool_calls:
                reason = "tool_calls"
            if delta.content is None and delta.reasoning_content is None and not delta.tool_calls:
                if reason is None and not (req.logprobs and c.logprobs):
                    continue
            choice = ChatStreamChoice(
                index=c.index,
                delta=delta,
                logprobs=_chat_logprobs(state, c.logprobs, top_n) if req.logprobs else None,
                finish_reason=reason,
                matched_stop=matched,
            )
            usage = None
            if req.stream_options is not None and req.stream_options.continuous_usage_stats:
                usage = UsageInfo(**usage_of([c], 1))
            yield sse(ChatCompletionChunk(**head, choices=[choice], usage=usage))
        if include_usage:
            chunks = [last[i] for i in sorted(last)]
            yield sse(
                ChatCompletionChunk(**head, choices=[], usage=UsageInfo(**usage_of(chunks, seqs.n)))
            )
    except (EngineError, APIError) as e:
        yield sse_error(e)
    finally:
        await seqs.aclose()
    yield DONE


# ---- completions --------------------------------------------------------------------------------
async def _completion_prompts(
    state: ServerState, prompt, n: int
) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt (a string, strings, ids, or lists of ids)."""
    prompt, _ = as_batch(prompt, "prompt")
    check_batch(len(prompt), n, "prompt")

    def encode() -> list[list[int]]:
        return [
            state.client.encode(check_text(p, "prompt")) if isinstance(p, str) else list(p)
            for p in prompt
        ]

    texts = [p if isinstance(p, str) else None for p in prompt]
    return await off_loop(encode), texts


def _completion_logprobs(
    state: ServerState, lps: list, top_n: int, offset: int
) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for token_id, lp, alts in lps:
        text = state.token_text(token_id)
        out.tokens.append(text)
        out.token_logprobs.append(_finite(lp))
        out.top_logprobs.append(
            {state.token_text(a): _finite(alp) for a, alp in alts[:top_n]} if top_n else None
        )
        out.text_offset.append(offset)
        offset += len(text)
    return out


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    state = get_state(request)
    model = _prepare(state, req)
    if req.suffix:
        raise bad_request("suffix: insertion (suffix) is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of: only best_of == n is supported", "best_of")
    if req.echo and req.logprobs is not None:
        raise bad_request("echo: prompt logprobs (echo with logprobs) are not supported", "echo")
    ids, texts = await _completion_prompts(state, req.prompt, req.n)
    for p in ids:
        check_prompt(state.info, p, "prompt", max_tokens=req.max_tokens)
    max_tokens = req.max_tokens if req.max_tokens is not None else 16
    params = make_params(_params_fields(req, max_tokens), state.info, openai_names=True)
    want_lp = req.logprobs is not None
    top_n = req.logprobs or 0
    seqs = await start_sequences(
        state, ids, [params] * len(ids), "/v1/completions", req.rid, want_lp, top_n, req.timeout
    )
    echoes = []
    if req.echo:
        echoes = [
            t if t is not None else state.client.tokenizer.decode(i)
            for i, t in zip(ids, texts, strict=True)
        ]
    if req.stream:
        return SSEResponse(_stream_completion(state, req, seqs, model, top_n, echoes))
    finals = await until_disconnected(request, collect(seqs))
    choices = []
    for f in finals:
        reason, matched = finish_reason(f.chunk)
        prefix = echoes[f.chunk.index // seqs.n] if echoes else ""
        choices.append(
            CompletionChoice(
                index=f.chunk.index,
                text=prefix + f.chunk.text,
                logprobs=_completion_logprobs(state, f.logprobs, top_n, 0) if want_lp else None,
                finish_reason=reason,
                matched_stop=matched,
            )
        )
    return CompletionResponse(
        id=f"cmpl-{seqs.rid}",
        model=model,
        choices=choices,
        usage=UsageInfo(**usage_of([f.chunk for f in finals], seqs.n)),
    )


async def _stream_completion(
    state: ServerState,
    req: CompletionRequest,
    seqs: Sequences,
    model: str,
    top_n: int,
    echoes: list[str],
) -> AsyncIterator[str]:
    head = {"id": f"cmpl-{seqs.rid}", "created": int(time.time()), "model": model}
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    last: dict[int, GenerateChunk] = {}
    offsets: dict[int, int] = {}
    try:
        async for c in seqs.merged():
            first = c.index not in last
            last[c.index] = c
            reason, matched = finish_reason(c)
            text = c.delta
            if first and echoes:
                text = echoes[c.index // seqs.n] + text
            if not text and reason is None and not (req.logprobs is not None and c.logprobs):
                continue
            lps = None
            if req.logprobs is not None:
                lps = _completion_logprobs(state, c.logprobs, top_n, offsets.get(c.index, 0))
                offsets[c.index] = offsets.get(c.index, 0) + sum(len(t) for t in lps.tokens)
            choice = CompletionChoice(
                index=c.index, text=text, logprobs=lps, finish_reason=reason, matched_stop=matched
            )
            yield sse(CompletionChunk(**head, choices=[choice]))
        if include_usage:
            chunks = [last[i] for i in sorted(last)]
            yield sse(
                CompletionChunk(**head, choices=[], usage=UsageInfo(**usage_of(chunks, seqs.n)))
            )
    except (EngineError, APIError) as e:
        yield sse_error(e)
    finally:
        await seqs.aclose()
    yield DONE


# ---- embeddings ---------------------------------------------------------------------------------
def _embedding_inputs(state: ServerState, inp) -> list[list[int]]:
    inputs, _ = as_batch(inp, "input")
    if len(inputs) > _MAX_EMBEDDING_INPUTS:
        raise bad_request(f"input: at most {_MAX_EMBEDDING_INPUTS} inputs per request", "input")
    out = []
    for i, x in enumerate(inputs):
        if isinstance(x, str):
            if not x:
                raise bad_request(f"input[{i}]: must not be an empty string", "input")
            x = state.client.encode(check_text(x, "input"))
        check_prompt(state.info, list(x), "input", where=f"input[{i}]")
        out.append(list(x))
    return out


def _check_dimensions(dimensions: int | None, state: ServerState) -> None:
    """OpenAI's `dimensions`: the model's own size always works; a smaller one only for a
    model trained for it (Matryoshka, as vLLM reads it from the config); else a 400."""
    info = state.info.embedding
    if dimensions is None or dimensions == info.dimensions:
        return
    allowed = info.matryoshka_dimensions
    if allowed is None:
        raise bad_request(
            f"dimensions: {state.model_name} does not support changing the output dimensions "
            f"(it produces {info.dimensions})",
            "dimensions",
        )
    if dimensions > info.dimensions or (allowed and dimensions not in allowed):
        choices = ", ".join(map(str, allowed)) if allowed else f"1..{info.dimensions}"
        raise bad_request(
            f"dimensions: {dimensions} is not one of this model's sizes ({choices})", "dimensions"
        )


def _cut(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Truncate and renormalize, so cosine similarity keeps working."""
    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    cut = vectors[:, :dimensions]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.maximum(norms, 1e-12)


@router.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    state = get_state(request)
    state.check_ready()
    model = state.check_model(req.model)
    if not state.info.is_embedding:
        raise APIError(
            400,
            f"{model} is a generation model; start the server with --is-embedding and an "
            "embedding model to serve /v1/embeddings",
            code="model_not_embedding",
        )
    _check_dimensions(req.dimensions, state)
    ids = await off_loop(_embedding_inputs, state, req.input)
    try:
        vectors = await until_disconnected(request, state.client.embed(ids))
    except ValueError as e:
        raise bad_request(f"input: {e}", "input") from e
    except EngineError as e:
        raise APIError(503, f"engine unavailable: {e}", code="engine_error") from e
    arr = _cut(np.asarray(vectors, dtype=np.float32), req.dimensions)
    if req.encoding_format == "base64":
        data = [
            EmbeddingData(embedding=base64.b64encode(v.astype("<f4").tobytes()).decode(), index=i)
            for i, v in enumerate(arr)
        ]
    else:
        data = [EmbeddingData(embedding=v.tolist(), index=i) for i, v in enumerate(arr)]
    tokens = sum(len(x) for x in ids)
    return EmbeddingResponse(
        data=data, model=model, usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens)
    )


class _ToolMode:
    """How one chat request treats tools and reasoning: whether the template sees the
    tools, the schema a required/named choice enforces, and how text becomes fields."""

    def __init__(self, render: bool, schema: dict | None, parser, reasoning) -> None:
        self.render, self.schema, self.parser, self.reasoning = render, schema, parser, reasoning

    @classmethod
    def of(cls, state: ServerState, req: ChatCompletionRequest) -> _ToolMode:
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


class _StreamView:
    """Turns a sequence's cumulative text into OpenAI deltas of content, reasoning and,
    at the end, tool calls (each call sent whole, in one delta)."""

    def __init__(self, mode: _ToolMode) -> None:
        self.mode = mode
        self.sent_reasoning = 0
        self.sent_content = 0

    def advance(self, text: str, finished: bool) -> DeltaMessage:
        reasoning, content, calls = self.mode.split(text, finished)
        reasoning, content = reasoning or "", content or ""
        d_reason = reasoning[self.sent_reasoning :]
        d_content = content[self.sent_content :]
        self.sent_reasoning, self.sent_content = len(reasoning), len(content)
        return DeltaMessage(
            content=d_content or None,
            reasoning_content=d_reason or None,
            tool_calls=[c.to_openai(index=i) for i, c in enumerate(calls)] or None,
        )
