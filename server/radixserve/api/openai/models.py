"""/v1/models: the one served model."""

from __future__ import annotations

from fastapi import APIRouter, Request

from radixserve.api.protocol import ModelCard, ModelList
from radixserve.api.state import ServerState, get_state

router = APIRouter()


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
