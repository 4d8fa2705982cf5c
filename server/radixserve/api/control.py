"""SGLang's control routes that operators script against, beside our own: /get_model_info,
/get_server_info, /get_load, vLLM's /v1/tokenize and /v1/detokenize (aliases of
/server_info, /tokenize and /detokenize: one handler answers both names), and the engine
controls /update_weights_from_disk, /start_profile and /stop_profile."""

from __future__ import annotations

import os
import tempfile
import uuid

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from radixserve.api import native
from radixserve.api.errors import APIError, bad_request
from radixserve.api.state import ServerState, get_state
from radixserve.engine.client import EngineError
from radixserve.engine.io_struct import ControlReply, ProfileReq, UpdateWeightsReq

router = APIRouter()

for _path, _handler, _methods in (
    ("/get_server_info", native.server_info, ["GET"]),
    ("/v1/tokenize", native.tokenize, ["POST"]),
    ("/v1/detokenize", native.detokenize, ["POST"]),
):
    router.add_api_route(_path, _handler, methods=_methods)


@router.get("/get_model_info")
async def get_model_info(request: Request) -> dict:
    """SGLang's fields, and the context and vocabulary a client plans with."""
    state = get_state(request)
    state.check_ready()
    info = state.info
    return {
        "model_path": info.model_path,
        "tokenizer_path": state.args.tokenizer_path or info.model_path,
        "served_model_name": state.model_name,
        "is_generation": not info.is_embedding,
        "context_length": info.context_length,
        "vocab_size": info.vocab_size,
        "dtype": info.dtype,
        "device": info.device,
    }


@router.get("/get_load")
async def get_load(request: Request) -> list[dict]:
    """SGLang's load report, one entry per data-parallel rank (we run one): requests the
    engine holds and the KV tokens they use, for a router that balances replicas."""
    state = get_state(request)
    stats = state.client.stats
    return [
        {
            "dp_rank": 0,
            "num_reqs": stats.num_running + stats.num_waiting,
            "num_running_reqs": stats.num_running,
            "num_waiting_reqs": stats.num_waiting,
            "num_tokens": stats.kv_used_tokens,
            "kv_total_tokens": stats.kv_total_tokens,
            "in_flight_requests": state.in_flight,
        }
    ]


# ---- engine control -------------------------------------------------------------------------
class UpdateWeightsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_path: str
    load_format: str | None = None  # SGLang's; the file or folder says its format here


class ProfileRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    output_dir: str | None = None


async def _control(state: ServerState, msg: UpdateWeightsReq | ProfileReq) -> ControlReply:
    try:
        reply = await state.client.control(msg)
    except EngineError as e:
        raise APIError(503, f"engine unavailable: {e}", code="engine_error") from e
    if not reply.ok:
        raise APIError(400, reply.message, code="engine_refused")
    return reply


@router.post("/update_weights_from_disk")
async def update_weights_from_disk(req: UpdateWeightsRequest, request: Request) -> dict:
    """Reload weights of the same architecture in place, draining: the engine admits no
    new request until the running ones finish; requests that arrive meanwhile wait (none is
    refused or lost) and run on the new weights. Answers once the swap is done."""
    state = get_state(request)
    state.check_ready()
    state.check_generation()
    if not os.path.exists(req.model_path):
        raise bad_request(f"model_path: {req.model_path!r} does not exist", "model_path")
    reply = await _control(state, UpdateWeightsReq(uuid.uuid4().hex, req.model_path))
    state.info.model_path = reply.path
    return {"success": True, "message": reply.message, "model_path": reply.path}


@router.api_route("/start_profile", methods=["GET", "POST"])
async def start_profile(request: Request, req: ProfileRequest | None = None) -> dict:
    """torch.profiler in the engine process until /stop_profile; the trace goes to the
    request's output_dir, else --profile-dir, else <tmp>/radixserve-profile."""
    state = get_state(request)
    state.check_ready()
    out = (req and req.output_dir) or state.args.profile_dir
    out = out or os.path.join(tempfile.gettempdir(), "radixserve-profile")
    reply = await _control(state, ProfileReq(uuid.uuid4().hex, "start", os.path.abspath(out)))
    return {"success": True, "message": reply.message, "output_dir": os.path.abspath(out)}


@router.api_route("/stop_profile", methods=["GET", "POST"])
async def stop_profile(request: Request) -> dict:
    state = get_state(request)
    state.check_ready()
    reply = await _control(state, ProfileReq(uuid.uuid4().hex, "stop"))
    return {"success": True, "message": reply.message, "trace": reply.path}
