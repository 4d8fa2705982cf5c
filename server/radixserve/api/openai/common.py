"""What chat and completions share: the request's sampling fields, finish reasons and
usage in OpenAI's shape, and the skeleton of their responses and streams (a choice per
sequence and usage; or a chunk per update, usage last)."""

from __future__ import annotations

import json
import math
import time
from typing import Any

from pydantic import BaseModel

from radixserve.api.errors import bad_request
from radixserve.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseFormat,
    SamplingExtras,
    StreamOptions,
    UsageInfo,
)
from radixserve.api.serving import Final, Formatter, Sequences
from radixserve.api.state import ServerState
from radixserve.engine.client import GenerateChunk


def open_generation(state: ServerState, req: SamplingExtras) -> tuple[str, str | None]:
    """(the model name answers carry, the LoRA adapter `model` selects or None), once the
    server is ready and generates; else the error."""
    state.check_ready()
    state.check_generation()
    return state.resolve_model(req.model)


def grammar_of(rf: ResponseFormat | None) -> str | None:
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


def params_fields(req: ChatCompletionRequest | CompletionRequest, max_tokens: int) -> dict:
    """The engine's sampling fields (SGLang's names) of an OpenAI request."""
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
        "json_schema": grammar_of(req.response_format),
    }


def finite(lp: float) -> float:
    """-inf (a token the sampler ruled out) as OpenAI's floor, so the JSON stays valid."""
    return lp if math.isfinite(lp) else -9999.0


def finish_reason(chunk: GenerateChunk) -> tuple[str | None, int | str | None]:
    """OpenAI's finish_reason and SGLang's matched_stop from the engine's reason."""
    fr = chunk.finish_reason
    if fr is None:
        return None, None
    return fr.type, fr.matched_stop


def usage_of(chunks: list[GenerateChunk], n: int) -> UsageInfo:
    """Usage over choices: each prompt counted once (choice 0 of its group), every completion."""
    prompt = sum(c.prompt_tokens for c in chunks[::n])
    cached = sum(c.cached_tokens for c in chunks[::n])
    completion = sum(c.completion_tokens for c in chunks)
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details={"cached_tokens": cached},
    )


class ChoicesFormatter(Formatter):
    """Chat and completions alike: a response of one choice per sequence plus usage, or a
    stream of chunks of one choice each, usage at the end when asked for. Subclasses say
    what a choice is (`choice`, `stream_choice`: None for an update with nothing to send)."""

    prefix: str
    response_type: type[BaseModel]
    chunk_type: type[BaseModel]

    def __init__(
        self, state: ServerState, model: str, options: StreamOptions | None, per_chunk_usage: bool
    ) -> None:
        self.state = state
        self.model = model
        self.include_usage = options is not None and options.include_usage
        self.per_chunk_usage = per_chunk_usage
        self.last: dict[int, GenerateChunk] = {}
        self.head: dict[str, Any] = {}

    def choice(self, seqs: Sequences, final: Final) -> BaseModel:
        raise NotImplementedError

    def stream_choice(self, seqs: Sequences, chunk: GenerateChunk) -> BaseModel | None:
        raise NotImplementedError

    def response(self, seqs: Sequences, finals: list[Final]) -> BaseModel:
        return self.response_type(
            id=f"{self.prefix}-{seqs.rid}",
            model=self.model,
            choices=[self.choice(seqs, f) for f in finals],
            usage=usage_of([f.chunk for f in finals], seqs.n),
        )

    def opening(self, seqs: Sequences) -> list[BaseModel]:
        self.head = {"id": f"{self.prefix}-{seqs.rid}", "created": int(time.time())}
        self.head["model"] = self.model
        return []

    def event(self, seqs: Sequences, chunk: GenerateChunk) -> BaseModel | None:
        self.last[chunk.index] = chunk
        choice = self.stream_choice(seqs, chunk)
        if choice is None:
            return None
        usage = usage_of([chunk], 1) if self.per_chunk_usage else None
        return self.chunk_type(**self.head, choices=[choice], usage=usage)

    def closing(self, seqs: Sequences) -> list[BaseModel]:
        if not self.include_usage:
            return []
        chunks = [self.last[i] for i in sorted(self.last)]
        return [self.chunk_type(**self.head, choices=[], usage=usage_of(chunks, seqs.n))]
