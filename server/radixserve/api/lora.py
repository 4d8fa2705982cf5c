"""Loading and unloading LoRA adapters at run time: SGLang's /load_lora_adapter and
/unload_lora_adapter, and vLLM's /v1/ names for the same. Both need the API key when one is
set (the middleware guards every route but the probes).

Unload waits: the engine stops accepting requests for the adapter at once, lets the ones
already accepted (waiting or running) finish, then frees it and answers; none is lost."""

from __future__ import annotations

from collections.abc import Awaitable

from fastapi import APIRouter, Request

from radixserve.api.errors import APIError
from radixserve.api.protocol import LoadLoraRequest, UnloadLoraRequest
from radixserve.api.state import ServerState, get_state
from radixserve.config import check_lora_name
from radixserve.engine.client import EngineError
from radixserve.engine.io_struct import LoraReply

router = APIRouter()


def _open(state: ServerState) -> None:
    state.check_ready()
    state.check_generation()
    if not state.args.enable_lora:
        raise APIError(
            400, "LoRA is off: start the server with --enable-lora", code="lora_disabled"
        )


async def _answer(call: Awaitable[LoraReply]) -> dict:
    try:
        reply = await call
    except EngineError as e:
        raise APIError(503, f"engine unavailable: {e}", code="engine_error") from e
    if not reply.success:
        code = "model_not_found" if reply.status_code == 404 else "invalid_lora_adapter"
        raise APIError(reply.status_code, reply.message, param="lora_name", code=code)
    return {"success": True, "message": reply.message}


@router.post("/load_lora_adapter")
@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(req: LoadLoraRequest, request: Request) -> dict:
    state = get_state(request)
    _open(state)
    try:
        check_lora_name(req.lora_name)
    except ValueError as e:
        raise APIError(400, str(e), param="lora_name") from e
    if req.lora_name == state.model_name:
        raise APIError(400, "lora_name: that is the base model's name", param="lora_name")
    return await _answer(state.client.load_lora(req.lora_name, req.lora_path))


@router.post("/unload_lora_adapter")
@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(req: UnloadLoraRequest, request: Request) -> dict:
    state = get_state(request)
    _open(state)
    return await _answer(state.client.unload_lora(req.lora_name))
