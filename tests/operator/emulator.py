"""kmock plus the few things a real API server does that the operator relies on.

kmock stores objects and merges dict patches; it has no server-side apply, no label
selectors on list/watch, no resourceVersion or `metadata.generation` bookkeeping, no
status subresource, no quantity canonicalisation and no admission. Each is written in here
the way kube-apiserver behaves, as small as the tests need, and says so. Every write
(create, merge or JSON patch, apply, delete) goes through `_serve_write`:

- `metadata.resourceVersion`: a cluster-wide counter, bumped on every stored write and
  sent with its watch event; a write that changes nothing stores nothing and sends no
  event. kopf relies on it: after a patch it waits for the event carrying the patch's
  resourceVersion before it trusts a body again, and its finalizer JSON patches `test`
  the resourceVersion they were computed from (a mismatch is a 422);
- `metadata.generation`: 1 on create, +1 only when a write changes `spec`; what a client
  sends there is ignored;
- the status subresource: a write to `.../status` changes only `status`, a write to the
  object itself never does (for kinds that have the subresource);
- server-side apply (`PATCH` with `application/apply-patch+yaml`): creates a missing
  object, merges the applied fields into the live ones, lists of named items (containers,
  env, ports, volumes) by name, and removes the fields this field manager applied last
  time and no longer applies (a stand-in for managedFields); `dryRun=All` answers the
  result without storing it;
- deletion: an object with finalizers gets a deletionTimestamp and goes once the last
  finalizer is removed; `generateName` on create;
- quantities: a CPU written as a decimal ("0.5") is stored canonically ("500m");
- list and watch: label selectors (`key=value,...`); a list answers the current
  resourceVersion and a watch from it sends only later changes; what crossed the wire is
  counted per resource (`delivered` objects, `delivered_bytes` of their JSON);
- `admission`: callables (request, live, new) -> (status, message) | None, for the API
  server's refusals (a 422 on an invalid name or an immutable field).

Writes bypass kmock's reactions (`kmock[...] << ...`); the tests set none on writes.
"""

from __future__ import annotations

import collections
import copy
import datetime
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock as kmock_lib

APPLY = "application/apply-patch+yaml"
WRITES = (kmock_lib.action.CREATE, kmock_lib.action.UPDATE, kmock_lib.action.DELETE)
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


def merge_patch(live: Any, patch: Any) -> Any:
    """JSON merge patch (RFC 7386): objects merge, null removes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(live) if isinstance(live, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


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


class Refused(Exception):
    """The API server's answer to a write it does not take."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _version(value: str | None) -> int:
    """A resourceVersion as a number; objects a test stored directly may carry none."""
    return int(value) if value and value.isdigit() else 0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define(kw_only=True)
class ApiServer(kmock_lib.KubernetesEmulator):
    applied: dict[Key, dict[str, Any]] = attrs.field(factory=dict, init=False)
    admission: list[Admission] = attrs.field(factory=list, init=False)
    delivered: collections.Counter = attrs.field(factory=collections.Counter, init=False)
    delivered_bytes: collections.Counter = attrs.field(factory=collections.Counter, init=False)
    # (namespace, group, plural) of objects an apply created: the API server authorizes
    # `create` as well as `patch` for those.
    apply_creates: list[tuple[str | None, str, str]] = attrs.field(factory=list, init=False)
    _versions: int = attrs.field(default=1000, init=False)

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        if request.resource is not None and request.action in WRITES:
            return await self._serve_write(request)
        return await super()._handle(request)

    def _live(self, key: Key) -> dict[str, Any] | None:
        if key not in self._objects or self._objects[key].deleted:
            return None
        return copy.deepcopy(self._objects[key].raw)

    def _has_status_subresource(self, resource: Any) -> bool:
        try:
            return "status" in self._resources[resource].subresources
        except KeyError:
            return False

    def _key(self, request: Any) -> Key:
        if request.action != kmock_lib.action.CREATE:
            return (request.resource, request.namespace, request.name)
        meta = request.data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{self._versions + 1:x}"
        return (request.resource, request.namespace or meta.get("namespace"), meta.get("name"))

    def _written(self, request: Any, key: Key, live: dict[str, Any] | None) -> dict[str, Any]:
        """The object as a create, an apply, a JSON patch or a merge patch would leave it."""
        what = f"{request.resource.plural} {key[2]!r}"
        if request.action == kmock_lib.action.CREATE:
            if live is not None:
                raise Refused(409, f"{what} already exists")
            return copy.deepcopy(request.data)
        if request.headers.get("Content-Type", "").startswith(APPLY):
            previous = self.applied.get(key) if live is not None else None
            return apply_merge(live or {}, self._applied_body(request), previous)
        if live is None:
            raise Refused(404, f"{what} not found")
        if isinstance(request.data, list):
            try:
                return jsonpatch.apply_patch(live, request.data)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as error:
                raise Refused(422, f"the JSON patch does not apply to {what}: {error}") from None
        return merge_patch(live, request.data)

    @staticmethod
    def _applied_body(request: Any) -> dict[str, Any]:
        return request.data if isinstance(request.data, dict) else json.loads(request.text)

    async def _serve_write(self, request: Any) -> aiohttp.web.StreamResponse:
        if request.resource not in self._get_resources():
            return _status(404, f"the server could not find the requested resource {request.url}")
        applying = request.headers.get("Content-Type", "").startswith(APPLY)
        async with self._lock:
            key = self._key(request)
            live = self._live(key)
            if request.action == kmock_lib.action.DELETE:
                return await self._delete(request, key, live)
            try:
                new = self._written(request, key, live)
            except Refused as refused:
                return _status(refused.code, refused.message)
            canonicalise(new)
            self._scope_to_subresource(request, live, new)
            self._stamp(live, new)
            for check in self.admission:
                refusal = check(request, live, new)
                if refusal:
                    return _status(*refusal)
            if request.params.get("dryRun") == "All":
                return aiohttp.web.json_response(new, status=200)
            if new == live:
                return aiohttp.web.json_response(live, status=200)
            if applying:
                self.applied[key] = copy.deepcopy(self._applied_body(request))
                if live is None:
                    self.apply_creates.append(
                        (request.namespace, request.resource.group or "", request.resource.plural)
                    )
            await self._store(request.resource, key, live, new)
        return aiohttp.web.json_response(new, status=201 if live is None else 200)

    def _scope_to_subresource(
        self, request: Any, live: dict[str, Any] | None, new: dict[str, Any]
    ) -> None:
        """A write to `/status` changes only the status; one to the object, never it."""
        if live is None:
            return
        if request.subresource == "status":
            status = new.get("status")
            new.clear()
            new.update({k: v for k, v in live.items() if k != "status"})
            if status is not None:
                new["status"] = status
        elif self._has_status_subresource(request.resource):
            new.pop("status", None)
            if "status" in live:
                new["status"] = live["status"]

    def _stamp(self, live: dict[str, Any] | None, new: dict[str, Any]) -> None:
        """The metadata the API server owns: uid, generation (a spec change only), and the
        resourceVersion the client last saw (a new one comes with storing)."""
        meta = new.setdefault("metadata", {})
        if live is None:
            meta.setdefault("uid", f"uid-{meta.get('name')}-{self._versions + 1}")
            meta["generation"] = 1
            return
        before = live.get("metadata", {})
        generation = before.get("generation", 1)
        meta["generation"] = generation + 1 if new.get("spec") != live.get("spec") else generation
        if "resourceVersion" in before:
            meta["resourceVersion"] = before["resourceVersion"]

    async def _store(
        self, resource: Any, key: Key, live: dict[str, Any] | None, new: dict[str, Any]
    ) -> None:
        """Store a changed object under a new resourceVersion and tell the watchers. An
        object marked for deletion goes once it has no finalizer left."""
        self._versions += 1
        meta = new["metadata"]
        meta["resourceVersion"] = str(self._versions)
        if live is None:
            if key in self._objects:
                self._objects[key].create(new)
            else:
                self._objects[key] = new
            event = "ADDED"
        else:
            self._objects[key].history.append(new)
            event = "MODIFIED"
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._objects[key].delete()
            event = "DELETED"
        await self._buses[resource].put({"type": event, "object": new})

    async def _delete(
        self, request: Any, key: Key, live: dict[str, Any] | None
    ) -> aiohttp.web.StreamResponse:
        if live is None:
            return _status(404, f"{request.resource.plural} {request.name!r} not found")
        if live["metadata"].get("deletionTimestamp"):
            return aiohttp.web.json_response(live, status=200)  # already going
        new = copy.deepcopy(live)
        new["metadata"]["deletionTimestamp"] = _now()
        await self._store(request.resource, key, live, new)
        return aiohttp.web.json_response(new, status=200)

    async def _serve_list(self, request: Any) -> Any:
        payload = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        payload["items"] = [item for item in payload["items"] if selects(selector, item)]
        payload["metadata"]["resourceVersion"] = str(self._versions)
        for item in payload["items"]:
            self._count(request.resource, item)
        return payload

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        """Only changes after the `resourceVersion` the client listed at (kmock would replay
        every object it holds) and only objects the label selector picks."""
        selector = request.params.get("labelSelector")
        since = _version(request.params.get("resourceVersion"))
        async for event in super()._serve_watch(request):
            if isinstance(event, dict):
                found = event.get("object", {})
                if not selects(selector, found):
                    continue
                if _version(found.get("metadata", {}).get("resourceVersion")) <= since:
                    continue
                self._count(request.resource, found)
            yield event

    def _count(self, resource: Any, obj: dict[str, Any]) -> None:
        """Under the resource's `group/version/plural` ("apps/v1/deployments")."""
        key = "/".join(part for part in (resource.group, resource.version, resource.plural) if part)
        self.delivered[key] += 1
        self.delivered_bytes[key] += len(json.dumps(obj))
