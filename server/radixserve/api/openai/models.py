"""/v1/models: the served model, then each loaded LoRA adapter with the model as parent."""

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


def _adapter_cards(state: ServerState) -> dict[str, ModelCard]:
    return {
        name: ModelCard(
            id=name,
            created=int(state.started_at),
            root=source,
            parent=state.model_name,
            max_model_len=state.info.context_length,
        )
        for name, source in state.client.lora_adapters.items()
    }


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    state = get_state(request)
    state.check_ready()
    return ModelList(data=[_card(state), *_adapter_cards(state).values()])


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    state = get_state(request)
    state.check_ready()
    adapter = _adapter_cards(state).get(model_id)
    if adapter is not None:
        return adapter
    state.check_model(model_id)
    return _card(state)
