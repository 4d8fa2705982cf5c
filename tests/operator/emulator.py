"""kmock plus the few things a real API server does that the operator relies on.

kmock stores objects and merges dict patches; it has no server-side apply, no label
selectors on list/watch, no `metadata.generation`, no quantity canonicalisation and no
admission. Each is written in here the way kube-apiserver behaves, as small as the tests
need, and says so:

- server-side apply (`PATCH` with `application/apply-patch+yaml`): creates a missing
  object, merges the applied fields into the live ones, lists of named items (containers,
  env, ports, volumes) by name, and removes the fields this field manager applied last
  time and no longer applies (a stand-in for managedFields); `dryRun=All` answers the
  result without storing it;
- `metadata.generation`: 1 on create, +1 whenever an apply changes `spec`;
- quantities: a CPU written as a decimal ("0.5") is stored canonically ("500m");
- label selectors (`key=value,...`) on list and watch, counted per resource in
  `delivered` so a test can see what crossed the wire;
- `admission`: callables (request, live, new) -> (status, message) | None, for the API
  server's refusals (a 422 on an invalid name or an immutable field).
"""

from __future__ import annotations

import collections
import copy
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp.web
import attrs
import kmock as kmock_lib

APPLY = "application/apply-patch+yaml"
Key = tuple[Any, str | None, str]
Admission = Callable[[Any, dict[str, Any] | None, dict[str, Any]], tuple[int, str] | None]


def _named(items: Any) -> bool:
    return (
        isinstance(items, list)
        and bool(items)
        and all(isinstance(i, dict) and "name" in i for i in items)
    )


def apply_merge(live: Any, applied: Any, previous: Any) -> Any:
    """Server-side apply's merge for one field manager (its last applied set in `previous`)."""
    if isinstance(applied, dict) and isinstance(live, dict):
        previous = previous if isinstance(previous, dict) else {}
        out = {k: v for k, v in live.items() if k in applied or k not in previous}
        for key, value in applied.items():
            out[key] = apply_merge(live.get(key), value, previous.get(key))
        return out
    if _named(applied) and (_named(live) or live == []):
        previous = previous if _named(previous) else []
        before = {item["name"]: item for item in previous}
        now = {item["name"]: item for item in applied}
        ours = []
        for item in applied:
            current = next((i for i in live if i["name"] == item["name"]), {})
            ours.append(apply_merge(current, item, before.get(item["name"])))
        others = [i for i in live if i["name"] not in now and i["name"] not in before]
        return ours + others
    return copy.deepcopy(applied)


def _canonical_cpu(value: Any) -> Any:
    if isinstance(value, str | int | float) and re.fullmatch(r"\d*\.\d+", str(value)):
        return f"{round(float(value) * 1000)}m"
    return value


def canonicalise(obj: dict[str, Any]) -> None:
    """CPU quantities in containers' resources, as the API server stores them."""
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        for section in ("requests", "limits"):
            values = container.get("resources", {}).get(section, {})
            if "cpu" in values:
                values["cpu"] = _canonical_cpu(values["cpu"])


def selects(selector: str | None, obj: dict[str, Any]) -> bool:
    """Equality-based label selectors (`a=b,c=d`), the only kind the operator sends."""
    if not selector:
        return True
    found = obj.get("metadata", {}).get("labels") or {}
    pairs = [term.split("=", 1) for term in selector.split(",") if term]
    return all(found.get(key) == value for key, value in pairs)


def _status(code: int, message: str) -> aiohttp.web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "code": code,
    }
    return aiohttp.web.json_response(body, status=code)


@attrs.define(kw_only=True)
class ApiServer(kmock_lib.KubernetesEmulator):
    applied: dict[Key, dict[str, Any]] = attrs.field(factory=dict, init=False)
    admission: list[Admission] = attrs.field(factory=list, init=False)
    delivered: collections.Counter = attrs.field(factory=collections.Counter, init=False)
    # (namespace, group, plural) of objects an apply created: the API server authorizes
    # `create` as well as `patch` for those.
    apply_creates: list[tuple[str | None, str, str]] = attrs.field(factory=list, init=False)
    _versions: int = attrs.field(default=1000, init=False)

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        content_type = request.headers.get("Content-Type", "")
        if request.resource is not None and request.name and content_type.startswith(APPLY):
            return await self._serve_apply(request)
        return await super()._handle(request)

    async def _serve_apply(self, request: Any) -> aiohttp.web.StreamResponse:
        if request.resource not in self._get_resources():
            return _status(404, f"the server could not find the requested resource {request.url}")
        body = request.data if isinstance(request.data, dict) else json.loads(request.text)
        key = (request.resource, request.namespace, request.name)
        dry_run = request.params.get("dryRun") == "All"
        async with self._lock:
            exists = key in self._objects and not self._objects[key].deleted
            live = copy.deepcopy(self._objects[key].raw) if exists else None
            new = apply_merge(live or {}, body, self.applied.get(key) if exists else None)
            canonicalise(new)
            meta = new.setdefault("metadata", {})
            if live is None:
                meta.setdefault("uid", f"uid-{request.name}-{len(self.applied)}")
                meta["generation"] = 1
            elif new.get("spec") != live.get("spec"):
                meta["generation"] = live["metadata"].get("generation", 1) + 1
            for check in self.admission:
                refused = check(request, live, new)
                if refused:
                    return _status(*refused)
            if dry_run or new == live:
                return aiohttp.web.json_response(new, status=200)
            self._versions += 1
            meta["resourceVersion"] = str(self._versions)
            self.applied[key] = copy.deepcopy(body)
            if live is None:
                self.apply_creates.append(
                    (request.namespace, request.resource.group or "", request.resource.plural)
                )
                if key in self._objects:
                    self._objects[key].create(new)
                else:
                    self._objects[key] = new
                event = "ADDED"
            else:
                self._objects[key].history.append(new)
                event = "MODIFIED"
            await self._buses[request.resource].put({"type": event, "object": new})
        return aiohttp.web.json_response(new, status=201 if live is None else 200)

    async def _serve_list(self, request: Any) -> Any:
        payload = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        payload["items"] = [item for item in payload["items"] if selects(selector, item)]
        self.delivered[str(request.resource)] += len(payload["items"])
        return payload

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        selector = request.params.get("labelSelector")
        async for event in super()._serve_watch(request):
            if isinstance(event, dict):
                if not selects(selector, event.get("object", {})):
                    continue
                self.delivered[str(request.resource)] += 1
            yield event
