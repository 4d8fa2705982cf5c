"""OpenAI's routes, one module per endpoint; `common` holds what chat and completions share."""

from fastapi import APIRouter

from radixserve.api.openai import chat, completions, embeddings, models, responses

router = APIRouter()
for _module in (chat, completions, embeddings, models, responses):
    router.include_router(_module.router)
