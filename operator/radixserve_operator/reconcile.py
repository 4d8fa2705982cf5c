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
from . import adapters as adapters_
from . import spec as specs
from .kube import ApiError, KubeClient, object_path
from .probe import probe_model


def possible_children(name: str) -> list[list[tuple[str, str, str]]]:
    """(apiVersion, kind, name) of every child a spec may or may not ask for, in groups
    that come and go together, the first of each group standing for it: those the current
    spec does not ask for are deleted (e.g. autoscaling removed)."""
    epp = manifests.picker_name(name)
    return [
        [("v1", "PersistentVolumeClaim", manifests.model_cache_claim_name(name))],
        [("apps/v1", "Deployment", name)],
        [("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", name)],
        [("autoscaling/v2", "HorizontalPodAutoscaler", name)],
        [("keda.sh/v1alpha1", "ScaledObject", name)],
        [
            ("apps/v1", "Deployment", epp),
            ("v1", "Service", epp),
            ("rbac.authorization.k8s.io/v1", "RoleBinding", epp),
            ("rbac.authorization.k8s.io/v1", "Role", epp),
            ("v1", "ServiceAccount", epp),
        ],
        [("inference.networking.k8s.io/v1", "InferencePool", name)],
        [("gateway.networking.k8s.io/v1", "HTTPRoute", name)],
    ]


# Kinds a cluster serves only once their project is installed: their apiVersion, the
# field that asks for each, and what to install.
OPTIONAL_APIS = {
    "LeaderWorkerSet": (
        "leaderworkerset.x-k8s.io/v1",
        "parallelism.nodes above 1",
        "LeaderWorkerSet",
    ),
    "InferencePool": (
        "inference.networking.k8s.io/v1",
        "inferencePool",
        "the Gateway API Inference Extension's CRDs",
    ),
    "HTTPRoute": (
        "gateway.networking.k8s.io/v1",
        "inferencePool.gateway",
        "the Gateway API's CRDs",
    ),
    "ScaledObject": ("keda.sh/v1alpha1", "autoscaling.keda", "KEDA"),
}


def needed_apis(child: dict[str, Any], name: str) -> set[str]:
    """The optional kinds a child is useless without: the picker and the route serve only
    the pool, so they go (or stay out) with it."""
    kind = child["kind"]
    needs = {kind} & OPTIONAL_APIS.keys()
    if kind == "HTTPRoute" or child["metadata"]["name"] == manifests.picker_name(name):
        needs.add("InferencePool")
    return needs


def skipped_message(kind: str) -> str:
    api_version, field_name, install = OPTIONAL_APIS[kind]
    return (
        f"{field_name}: skipped, the {kind} API ({api_version}) is not installed; install {install}"
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


WORKLOADS = ("Deployment", "LeaderWorkerSet")
PROBE_DISABLED = status.Probe(True, "ProbeDisabled", "model probing is off; trusting pod readiness")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Reconciler:
    kube: KubeClient
    probe_models: bool = True
    probe_timeout: float = 5.0
    # Where the operator reaches each pod's server for adapter loads (tests move it).
    pod_port: int = manifests.SERVER_PORT
    adapter_timeout: float = 300.0
    # The endpoint picker's image for specs that name none (the chart's value).
    picker_image: str = manifests.DEFAULT_PICKER_IMAGE
    # How long a discovery answer (is this CRD installed?) is trusted.
    discovery_ttl: float = 30.0
    _locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    _served: dict[tuple[str, str], tuple[float, bool]] = field(default_factory=dict)

    async def serves(self, api_version: str, kind: str) -> bool:
        key = (api_version, kind)
        now_s = asyncio.get_running_loop().time()
        cached = self._served.get(key)
        if cached is None or now_s - cached[0] > self.discovery_ttl:
            cached = (now_s, await self.kube.serves(api_version, kind))
            self._served[key] = cached
        return cached[1]

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
        if "inferencePool" in spec:
            spec["inferencePool"]["picker"].setdefault("image", self.picker_image)
        problems = specs.problems(spec, name)
        previous = body.get("status", {}) or {}
        warnings: list[str] = []
        skipped: list[str] = []
        workload: dict[str, Any] | None = None
        probe: status.Probe | None = None
        adapters: list[dict[str, str]] | None = None
        failed: list[str] = []
        if problems:
            logger.warning("Invalid spec, nothing applied: %s", "; ".join(problems))
            workload = await self._live_workload(name, namespace, spec)
        else:
            warnings, api_key = await self._secret_warnings(namespace, spec)
            wanted = manifests.children(name, namespace, spec)
            missing = set()
            for child in wanted:
                for kind in needed_apis(child, name) - missing:
                    if not await self.serves(OPTIONAL_APIS[kind][0], kind):
                        missing.add(kind)
                        skipped.append(skipped_message(kind))
            if "LeaderWorkerSet" in missing:
                # The model cannot run at all: create nothing rather than half a group.
                warnings.append(f"{skipped_message('LeaderWorkerSet')}; nothing was created")
                wanted = []
            for child in wanted:
                if needed_apis(child, name) & missing:
                    continue
                kopf.adopt(child, owner=dict(body))
                try:
                    applied = await self.apply(child)
                except ApiError as error:
                    # One child failing (an immutable field, a refused name) must neither
                    # stop the others nor hide the reason: it goes into the status.
                    failed.append(
                        f"applying {child['kind']} {child['metadata']['name']}: "
                        f"{error.message or error}"
                    )
                    continue
                if child["kind"] in WORKLOADS and child["metadata"]["name"] == name:
                    workload = applied
            if wanted:
                await self._delete_unwanted(name, namespace, wanted)
            ready = (workload or {}).get("status", {}).get("readyReplicas", 0) or 0
            if self.probe_models and ready > 0:
                base = manifests.endpoint(name, namespace, spec).removesuffix("/v1")
                served = manifests.served_model_name(name, spec)
                probe = await probe_model(base, served, api_key, self.probe_timeout)
            if workload is not None and (spec.get("adapters") or previous.get("adapters")):
                adapters, errors = await self._sync_adapters(
                    name, namespace, spec, previous.get("adapters") or [], api_key
                )
                warnings += errors
        seen = status.Observed(
            name=name,
            namespace=namespace,
            generation=body["metadata"].get("generation"),
            spec=spec,
            problems=problems,
            warnings=failed + warnings,
            deployment=status.workload_view(workload),
            probe=probe if self.probe_models else PROBE_DISABLED,
            skipped=skipped,
            adapters=adapters,
        )
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

    async def _live_workload(
        self, name: str, namespace: str, spec: specs.Spec
    ) -> dict[str, Any] | None:
        if manifests.multi_node(spec):
            api_version, kind = "leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"
        else:
            api_version, kind = "apps/v1", "Deployment"
        return await self.kube.get(object_path(api_version, kind, namespace, name))

    async def _sync_adapters(
        self,
        name: str,
        namespace: str,
        spec: specs.Spec,
        previous: list[dict[str, str]],
        api_key: str | None,
    ) -> tuple[list[dict[str, str]], list[str]]:
        """Load and unload adapters on every ready serving pod; the loaded set is the
        adapters of the spec that every one of them has."""
        wanted = list(spec.get("adapters", []))
        selector = ",".join(f"{k}={v}" for k, v in manifests.serving_selector(name, spec).items())
        pods = await self.kube.list(object_path("v1", "Pod", namespace), selector)
        before = {adapter["name"]: adapter["source"] for adapter in previous}
        results = await asyncio.gather(
            *(
                adapters_.sync_pod(
                    f"http://{ip}:{self.pod_port}",
                    pod,
                    wanted,
                    before,
                    api_key,
                    self.adapter_timeout,
                )
                for pod, ip in adapters_.ready_pod_ips(pods)
            )
        )
        if not results:
            return [], []
        everywhere = set.intersection(*(result.loaded for result in results))
        loaded = [adapter for adapter in wanted if adapter["name"] in everywhere]
        errors = [f"adapters: {error}" for result in results for error in result.errors]
        return loaded, errors

    async def _delete_unwanted(
        self, name: str, namespace: str, wanted: list[dict[str, Any]]
    ) -> None:
        """Remove children the spec stopped asking for (e.g. autoscaling removed).

        One read per group when nothing is to delete (a resync's usual case): the first
        member stands for its group and is deleted last, so a pass cut short (a cancelled
        handler) leaves it for the next pass to find.
        """
        keep = {(child["kind"], child["metadata"]["name"]) for child in wanted}
        for group in possible_children(name):
            first = group[0]
            if (first[1], first[2]) in keep or not await self.serves(first[0], first[1]):
                continue
            if await self._owned(namespace, name, *first) is None:
                continue
            for api_version, kind, child_name in [*group[1:], first]:
                path = await self._owned(namespace, name, api_version, kind, child_name)
                if path is not None:
                    await self.kube.delete(path)

    async def _owned(
        self, namespace: str, owner: str, api_version: str, kind: str, name: str
    ) -> str | None:
        """The path of a child this ModelDeployment owns, or None when there is none."""
        path = object_path(api_version, kind, namespace, name)
        live = await self.kube.get(path)
        owners = (live or {}).get("metadata", {}).get("ownerReferences", [])
        if any(ref.get("kind") == KIND and ref.get("name") == owner for ref in owners):
            return path
        return None
