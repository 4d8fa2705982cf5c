"""One reconcile pass: apply the children a spec asks for, then write the status.

Every handler (create, update, resume, the resync timer, a child's event) calls the same
`Reconciler.reconcile`, so there is one path from spec to cluster and it is idempotent:
a child whose live state already covers the desired manifest is not written at all.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import kopf

from . import GROUP, KIND, VERSION, manifests, status
from . import spec as specs
from .kube import ApiError, KubeClient, object_path
from .probe import probe_model

LAST_APPLIED = f"{GROUP}/last-applied"
OPTIONAL_CHILDREN = (
    ("v1", "PersistentVolumeClaim", manifests.model_cache_pvc, manifests.model_cache_claim_name),
    ("autoscaling/v2", "HorizontalPodAutoscaler", manifests.hpa, lambda name: name),
    (
        "inference.networking.k8s.io/v1",
        "InferencePool",
        manifests.inference_pool,
        lambda name: name,
    ),
)


def covers(actual: Any, desired: Any) -> bool:
    """Whether the live object already holds every desired field (extra fields allowed).

    The API server adds defaults and status, so equality never holds; a patch is needed
    only when something we set is missing or different.
    """
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(
            key in actual and covers(actual[key], value) for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(covers(a, d) for a, d in zip(actual, desired, strict=True))
        )
    if isinstance(desired, int | float) and isinstance(actual, str):
        return str(desired) == actual  # quantities come back as strings
    return actual == desired


def removed(last: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any]:
    """A merge patch (None = delete) for keys we set last time and no longer want."""
    out: dict[str, Any] = {}
    for key, value in last.items():
        if key not in desired:
            out[key] = None
        elif isinstance(value, dict) and isinstance(desired[key], dict):
            nested = removed(value, desired[key])
            if nested:
                out[key] = nested
    return out


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def with_last_applied(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest, remembering itself in an annotation (as `kubectl apply` does)."""
    out = copy.deepcopy(manifest)
    annotations = out["metadata"].setdefault("annotations", {})
    annotations[LAST_APPLIED] = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return out


def merge_patch(live: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any]:
    """The desired fields, plus deletions of fields the previous apply set and this one does not.

    Without the deletions, dropping e.g. nodeSelector from a spec would leave it on the pods.
    """
    annotations = live.get("metadata", {}).get("annotations") or {}
    try:
        last = json.loads(annotations.get(LAST_APPLIED, "{}"))
    except json.JSONDecodeError:
        last = {}
    return _deep_merge(removed(last, desired), desired)


PROBE_DISABLED = status.Probe(True, "ProbeDisabled", "model probing is off; trusting pod readiness")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Reconciler:
    kube: KubeClient
    probe_models: bool = True
    probe_timeout: float = 5.0
    _locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create the object, or merge-patch it back to the desired fields."""
        meta = manifest["metadata"]
        kind, api_version = manifest["kind"], manifest["apiVersion"]
        path = object_path(api_version, kind, meta["namespace"], meta["name"])
        live = await self.kube.get(path)
        desired = with_last_applied(manifest)
        if live is None:
            return await self.kube.create(
                object_path(api_version, kind, meta["namespace"]), desired
            )
        if covers(live, desired):
            return live
        return await self.kube.patch(path, merge_patch(live, desired))

    async def _secret_warnings(
        self, namespace: str, spec: specs.Spec
    ) -> tuple[list[str], str | None]:
        """Missing Secrets (as messages) and the API key, when one is readable."""
        warnings: list[str] = []
        api_key: str | None = None
        refs = [("apiKeySecretRef", spec.get("apiKeySecretRef"))]
        refs.append(
            (
                "model.huggingFace.tokenSecretRef",
                spec["model"].get("huggingFace", {}).get("tokenSecretRef"),
            )
        )
        for field_name, ref in refs:
            if not ref:
                continue
            secret = await self.kube.get(object_path("v1", "Secret", namespace, ref["name"]))
            fix = (
                f"kubectl -n {namespace} create secret generic {ref['name']} "
                f"--from-literal={ref['key']}=..."
            )
            if secret is None:
                warnings.append(f"{field_name}: Secret {ref['name']!r} not found; create it: {fix}")
            elif ref["key"] not in secret.get("data", {}):
                warnings.append(f"{field_name}: Secret {ref['name']!r} has no key {ref['key']!r}")
            elif field_name == "apiKeySecretRef":
                api_key = base64.b64decode(secret["data"][ref["key"]]).decode()
        return warnings, api_key

    async def reconcile(
        self, body: kopf.Body | dict[str, Any], logger: logging.Logger | kopf.Logger
    ) -> dict[str, Any]:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            return await self._reconcile(body, logger)

    async def _reconcile(self, body: Any, logger: Any) -> dict[str, Any]:
        name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
        spec = specs.with_defaults(body.get("spec", {}))
        problems = specs.problems(spec)
        warnings: list[str] = []
        deployment: dict[str, Any] | None = None
        probe: status.Probe | None = None
        if problems:
            logger.warning("Invalid spec, nothing applied: %s", "; ".join(problems))
            deployment = await self.kube.get(object_path("apps/v1", "Deployment", namespace, name))
        else:
            warnings, api_key = await self._secret_warnings(namespace, spec)
            for child in manifests.children(name, namespace, spec):
                kopf.adopt(child, owner=dict(body))
                try:
                    applied = await self.apply(child)
                except ApiError as error:
                    if child["kind"] == "InferencePool" and error.status == 404:
                        warnings.append(
                            "inferencePool: the InferencePool CRD (inference.networking.k8s.io/v1) "
                            "is not installed; install the Gateway API Inference Extension"
                        )
                        continue
                    raise kopf.TemporaryError(
                        f"applying {child['kind']}: {error}", delay=10
                    ) from error
                if child["kind"] == "Deployment":
                    deployment = applied
            await self._delete_unwanted(name, namespace, spec)
            ready = (deployment or {}).get("status", {}).get("readyReplicas", 0) or 0
            if self.probe_models and ready > 0:
                base = manifests.endpoint(name, namespace, spec).removesuffix("/v1")
                served = manifests.served_model_name(name, spec)
                probe = await probe_model(base, served, api_key, self.probe_timeout)
        seen = status.Observed(
            name=name,
            namespace=namespace,
            generation=body["metadata"].get("generation"),
            spec=spec,
            problems=problems,
            warnings=warnings,
            deployment=deployment,
            probe=probe if self.probe_models else PROBE_DISABLED,
        )
        previous = body.get("status", {}) or {}
        new_status = status.build(seen, previous.get("conditions", []), now())
        if not covers(previous, new_status):
            # Conditions carry their own lastTransitionTime, so an unchanged status
            # compares equal and no write (and no watch event) happens.
            path = object_path(f"{GROUP}/{VERSION}", KIND, namespace, name) + "/status"
            await self.kube.patch(path, {"status": new_status})
        return new_status

    async def _delete_unwanted(self, name: str, namespace: str, spec: specs.Spec) -> None:
        """Remove optional children the spec stopped asking for (e.g. autoscaling removed)."""
        for api_version, kind, build, child_name in OPTIONAL_CHILDREN:
            if build(name, namespace, spec) is not None:
                continue
            path = object_path(api_version, kind, namespace, child_name(name))
            live = await self.kube.get(path)  # None also when the kind is not installed
            owners = (live or {}).get("metadata", {}).get("ownerReferences", [])
            if any(ref.get("kind") == KIND and ref.get("name") == name for ref in owners):
                await self.kube.delete(path)
