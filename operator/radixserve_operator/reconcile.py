"""One reconcile pass: apply the children a spec asks for, then write the status.

Every handler (create, update, resume, the resync timer, a child's event) calls the same
`Reconciler.reconcile`, so there is one path from spec to cluster and it is idempotent:
children are written with server-side apply, and only when a dry run says the apply
would change something.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
from dataclasses import dataclass, field
from typing import Any

import kopf

from . import GROUP, KIND, VERSION, manifests, status
from . import spec as specs
from .kube import ApiError, KubeClient, object_path
from .probe import probe_model

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


# What differs between a live object and the same object re-applied without any change:
# bookkeeping the API server rewrites, never a field the operator sets.
VOLATILE_METADATA = ("managedFields", "resourceVersion", "generation")


def same_object(live: dict[str, Any], would_be: dict[str, Any]) -> bool:
    """Whether a (dry-run) apply result equals the live object, bookkeeping aside.

    Both sides come from the API server, so defaults and canonical quantities ("0.5"
    stored as "500m") are already applied to both: no client-side guessing.
    """

    def strip(obj: dict[str, Any]) -> dict[str, Any]:
        meta = {k: v for k, v in obj.get("metadata", {}).items() if k not in VOLATILE_METADATA}
        return {**obj, "metadata": meta}

    return strip(live) == strip(would_be)


def pvc_immutable_change(live: dict[str, Any], desired: dict[str, Any]) -> str | None:
    """A PVC's access modes and storage class cannot change once it exists (the API server
    answers 422); say so in words instead of sending the patch."""
    live_spec, spec = live.get("spec", {}), desired["spec"]
    if live_spec.get("accessModes") != spec["accessModes"]:
        return (
            f"modelCache.accessMode cannot change on the existing claim "
            f"{live['metadata']['name']} ({live_spec.get('accessModes')} -> "
            f"{spec['accessModes']}): delete the PVC to recreate it, or revert the field"
        )
    wanted = spec.get("storageClassName")
    if wanted and live_spec.get("storageClassName") != wanted:
        return (
            f"modelCache.storageClassName cannot change on the existing claim "
            f"{live['metadata']['name']} ({live_spec.get('storageClassName')!r} -> {wanted!r}): "
            "delete the PVC to recreate it, or revert the field"
        )
    return None


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
        """Server-side apply the manifest, writing only when it would change something.

        A dry-run apply shows what the API server would store; when that equals the live
        object (defaults and canonical forms included), nothing is written, so a resync of
        an unchanged object sends no write and causes no watch event.
        """
        meta = manifest["metadata"]
        kind, api_version = manifest["kind"], manifest["apiVersion"]
        path = object_path(api_version, kind, meta["namespace"], meta["name"])
        live = await self.kube.get(path)
        if live is not None:
            if kind == "PersistentVolumeClaim" and (why := pvc_immutable_change(live, manifest)):
                raise ApiError(422, why)
            if same_object(live, await self.kube.apply(path, manifest, dry_run=True)):
                return live
        return await self.kube.apply(path, manifest)

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
        problems = specs.problems(spec, name)
        warnings: list[str] = []
        deployment: dict[str, Any] | None = None
        probe: status.Probe | None = None
        failed: list[str] = []
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
                    # One child failing (an immutable field, a refused name) must neither
                    # stop the others nor hide the reason: it goes into the status.
                    failed.append(
                        f"applying {child['kind']} {child['metadata']['name']}: "
                        f"{error.message or error}"
                    )
                    continue
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
            warnings=failed + warnings,
            deployment=deployment,
            probe=probe if self.probe_models else PROBE_DISABLED,
        )
        previous = body.get("status", {}) or {}
        new_status = status.build(seen, previous.get("conditions", []), now())
        if {key: previous.get(key) for key in new_status} != new_status:
            # Conditions carry their own lastTransitionTime, so an unchanged status
            # compares equal and no write (and no watch event) happens.
            path = object_path(f"{GROUP}/{VERSION}", KIND, namespace, name) + "/status"
            await self.kube.patch(path, {"status": new_status})
        if failed:
            # After the status is written, so `kubectl get md` shows why; kopf logs it as
            # an Event on the ModelDeployment and retries.
            raise kopf.TemporaryError("; ".join(failed), delay=10)
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
