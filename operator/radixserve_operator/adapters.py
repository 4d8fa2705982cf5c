"""LoRA adapters on running pods: load what the spec lists, unload what it dropped.

New pods start with the list (`--lora-paths`); the pods already serving get a change at
run time through the server's `/load_lora_adapter` and `/unload_lora_adapter`, called on
each ready pod at podIP:port, so an adapter is served without waiting for a rollout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class PodAdapters:
    """What one pod reported and what the calls to it did."""

    pod: str
    loaded: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


def ready_pod_ips(pods: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(name, podIP) of the pods that are ready and not going away."""
    found = []
    for pod in pods:
        meta, status = pod.get("metadata", {}), pod.get("status", {})
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions", [])
        )
        if ready and status.get("podIP") and not meta.get("deletionTimestamp"):
            found.append((meta["name"], status["podIP"]))
    return found


async def _error(response: aiohttp.ClientResponse) -> str:
    try:
        body = await response.json(content_type=None)
        message = body.get("error", {}).get("message") or body.get("message") or str(body)
    except (ValueError, AttributeError):
        message = (await response.text())[:200]
    return f"{response.status} {message}"


async def sync_pod(
    base_url: str,
    pod: str,
    wanted: list[dict[str, str]],
    previous: dict[str, str],
    api_key: str | None,
    timeout: float,
) -> PodAdapters:
    """Make one pod's adapters the wanted ones.

    `previous` maps names to the sources the operator last saw loaded; an adapter whose
    source changed is unloaded first, since loading a name again is idempotent only for
    the same source.
    """
    result = PodAdapters(pod)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with aiohttp.ClientSession(
            base_url=base_url, timeout=aiohttp.ClientTimeout(total=timeout), headers=headers
        ) as http:
            async with http.get("/v1/models") as response:
                if response.status != 200:
                    result.errors.append(f"{pod}: GET /v1/models: {await _error(response)}")
                    return result
                listed = (await response.json(content_type=None)).get("data", [])
            loaded = {item["id"] for item in listed if item.get("parent")}
            names = {adapter["name"] for adapter in wanted}
            stale = {
                a["name"]
                for a in wanted
                if a["name"] in loaded and previous.get(a["name"], a["source"]) != a["source"]
            }
            for adapter_name in sorted((loaded - names) | stale):
                body = {"lora_name": adapter_name}
                async with http.post("/unload_lora_adapter", json=body) as response:
                    if response.status not in (200, 404):
                        result.errors.append(
                            f"{pod}: unloading {adapter_name}: {await _error(response)}"
                        )
                        continue
                loaded.discard(adapter_name)
            for adapter in wanted:
                if adapter["name"] in loaded:
                    continue
                body = {"lora_name": adapter["name"], "lora_path": adapter["source"]}
                async with http.post("/load_lora_adapter", json=body) as response:
                    if response.status != 200:
                        result.errors.append(
                            f"{pod}: loading {adapter['name']} from {adapter['source']}: "
                            f"{await _error(response)}"
                        )
                        continue
                loaded.add(adapter["name"])
            result.loaded = loaded
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as error:
        result.errors.append(f"{pod}: {type(error).__name__}: {error}")
    return result
