"""/v1/embeddings: vectors for strings or token ids, OpenAI's `dimensions` and base64."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Request

from radixserve.api.errors import APIError, bad_request
from radixserve.api.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, UsageInfo
from radixserve.api.serving import off_loop, until_disconnected
from radixserve.api.state import ServerState, get_state
from radixserve.api.validate import as_batch, check_prompt, check_text
from radixserve.engine.client import EngineError

router = APIRouter()
_MAX_EMBEDDING_INPUTS = 2048


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
