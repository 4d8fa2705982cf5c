"""The operator's own check that a model answers through its Service.

Pod readiness only says each server's /health passed; this calls the Service the way a
client would: /health, then /v1/models (with the API key when one is set), and checks
that the served model is listed.
"""

from __future__ import annotations

import aiohttp

from .status import Probe


async def probe_model(
    base_url: str, served_name: str, api_key: str | None, timeout: float
) -> Probe:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            async with http.get(f"{base_url}/health") as response:
                if response.status != 200:
                    return Probe(False, "Unhealthy", f"GET /health answered {response.status}")
            async with http.get(f"{base_url}/v1/models", headers=headers) as response:
                if response.status in (401, 403):
                    return Probe(
                        False, "Unauthorized", f"GET /v1/models answered {response.status}"
                    )
                if response.status != 200:
                    return Probe(False, "Unhealthy", f"GET /v1/models answered {response.status}")
                models = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        return Probe(False, "Unreachable", f"{base_url}: {type(error).__name__}: {error}")
    data = models.get("data", []) if isinstance(models, dict) else []
    ids = [item.get("id") for item in data if isinstance(item, dict)]
    if served_name not in ids:
        return Probe(False, "ModelNotListed", f"/v1/models lists {ids}, not {served_name!r}")
    return Probe(True, "Serving", f"/v1/models lists {served_name!r}")
