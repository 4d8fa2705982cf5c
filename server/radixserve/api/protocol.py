"""Request and response bodies: OpenAI's shapes, plus SGLang's native /generate.

Requests forbid unknown fields, so a misspelt parameter is a 400 naming it instead of being
silently ignored. Types follow pydantic's lax mode, as in vLLM and SGLang (5.0 is an integer,
"true" a boolean; 5.5 and "hot" are 400s). Numbers must be finite. Ranges that the engine checks anyway
(SamplingParams.verify) are not repeated here.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

# a chat template renders every message on the CPU: ~0.07 ms each for SmolLM2's template
MAX_MESSAGES = 4096


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _examples(*examples: dict) -> ConfigDict:
    """Request examples for /docs and /openapi.json (the fuzz test starts from them too)."""
    return ConfigDict(json_schema_extra={"examples": list(examples)})


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())


# ---- shared pieces ----------------------------------------------------------------------------
class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class EngineHints(_Strict):
    """Fields of every generation route that steer the engine rather than the sampling."""

    # vLLM's: lower is more urgent; anything but 0 needs --enable-priority-scheduling
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)
    # vLLM's: requests share cached prefixes only with requests of the same salt (tenants)
    cache_salt: str | None = Field(None, min_length=1, max_length=256)


class SamplingExtras(EngineHints):
    """The extras SGLang and vLLM accept on both completion endpoints."""

    top_k: int | None = None
    min_p: FiniteFloat | None = None
    repetition_penalty: FiniteFloat | None = None
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    rid: str | None = Field(None, max_length=128)  # SGLang: a request id for /abort_request
    # seconds until the request is aborted (finish_reason abort); at most --request-timeout
    timeout: FiniteFloat | None = Field(None, gt=0)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


# ---- chat -------------------------------------------------------------------------------------
class ContentPart(BaseModel):
    """A part of a message's content; only text parts reach the model."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class ChatCompletionRequest(SamplingExtras):
    model_config = _examples(
        {
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0,
            "max_tokens": 16,
        }
    )
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    model: str | None = None
    frequency_penalty: FiniteFloat | None = None
    presence_penalty: FiniteFloat | None = None
    logit_bias: dict[str, FiniteFloat] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1, le=128)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: FiniteFloat | None = None
    top_p: FiniteFloat | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    continue_final_message: bool = False  # vLLM: extend the last assistant message


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatLogprob):
    top_logprobs: list[ChatLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None  # SGLang: the stop string or token that ended it


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# ---- completions ------------------------------------------------------------------------------
class CompletionRequest(SamplingExtras):
    model_config = _examples({"prompt": "The capital of France is", "max_tokens": 8})
    prompt: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    best_of: int | None = Field(None, ge=1)
    echo: bool = False
    frequency_penalty: FiniteFloat | None = None
    presence_penalty: FiniteFloat | None = None
    logit_bias: dict[str, FiniteFloat] | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(16, ge=0)
    n: int = Field(1, ge=1, le=128)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: FiniteFloat | None = None
    top_p: FiniteFloat | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# ---- embeddings -------------------------------------------------------------------------------
class EmbeddingRequest(_Strict):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: UsageInfo


# ---- models -----------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "radixserve"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- native (SGLang) --------------------------------------------------------------------------
class GenerateRequest(EngineHints):
    model_config = _examples(
        {
            "text": "The capital of France is",
            "sampling_params": {"temperature": 0, "max_new_tokens": 8},
        }
    )
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = Field(0, ge=0, le=20)
    # SGLang's: with return_logprob, the prompt's logprobs from this position (-1: none)
    logprob_start_len: int = Field(-1, ge=-1)
    rid: str | None = Field(None, max_length=128)
    timeout: FiniteFloat | None = Field(None, gt=0)  # as SamplingExtras.timeout
    lora_path: str | list[str | None] | None = None  # adapter name, or one per prompt


class LoadLoraRequest(_Strict):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(_Strict):
    lora_name: str = Field(min_length=1, max_length=256)


class TokenizeRequest(_Strict):
    prompt: str | None = None
    text: str | None = None  # SGLang's older name
    model: str | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    tokens: list[int]
    model: str | None = None


class AbortRequest(_Strict):
    rid: str = ""
    abort_all: bool = False
