"""The ModelDeployment's status, computed from what the operator observed.

Pure: the spec, the Deployment as read back, the model probe and the previous conditions
in; the whole status out. Conditions follow the Kubernetes convention (type, status,
reason, message, lastTransitionTime, observedGeneration) so `kubectl wait
--for=condition=Ready` works.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import manifests
from .spec import Spec


@dataclass(frozen=True)
class Probe:
    """What the operator saw calling the model's Service."""

    ok: bool
    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    name: str
    namespace: str
    generation: int | None
    spec: Spec
    problems: list[str]
    warnings: list[str]
    deployment: dict[str, Any] | None
    probe: Probe | None
    # What the spec asked for but the cluster cannot take (an optional CRD missing).
    skipped: list[str] = field(default_factory=list)
    # The adapters every ready pod has loaded; None when the operator did not look.
    adapters: list[dict[str, str]] | None = None


def workload_view(workload: dict[str, Any] | None) -> dict[str, Any] | None:
    """The serving workload as the rules below read a Deployment.

    A LeaderWorkerSet counts groups (a group is ready when all its pods are) and reports
    Available and Progressing conditions like a Deployment, but no observedGeneration, and
    a ready group is an available one.
    """
    if workload is None or workload.get("kind") != "LeaderWorkerSet":
        return workload
    view = {**workload, "metadata": dict(workload.get("metadata", {}))}
    view["metadata"].pop("generation", None)
    lws_status = dict(view.get("status", {}))
    lws_status.setdefault("availableReplicas", lws_status.get("readyReplicas", 0))
    view["status"] = lws_status
    return view


def _condition(conditions: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == kind), None)


def _mirror(deployment: dict[str, Any] | None, kind: str) -> tuple[str, str, str]:
    if deployment is None:
        return "Unknown", "DeploymentMissing", "the Deployment is not created yet"
    found = _condition(deployment.get("status", {}).get("conditions", []), kind)
    if found is None:
        return "Unknown", "NotReported", f"the Deployment reports no {kind} condition yet"
    return found.get("status", "Unknown"), found.get("reason", kind), found.get("message", "")


ROLLING_REASONS = ("ReplicaSetUpdated", "NewReplicaSetCreated", "FoundNewReplicaSet")


def rollout_pending(deployment: dict[str, Any], desired: int) -> str | None:
    """Why the Deployment does not serve the current spec everywhere yet; None once it does.

    Ready counts alone lie right after a spec change: the old ReplicaSet's pods are still
    ready until the controller has observed the new generation and replaced them. (Ready
    also needs availableReplicas = desired; `_phase` checks that.)
    """
    generation = deployment.get("metadata", {}).get("generation")
    status = deployment.get("status", {})
    observed = status.get("observedGeneration")
    if generation is not None and (observed is None or observed < generation):
        return f"the Deployment controller has not observed generation {generation} yet"
    updated = status.get("updatedReplicas", 0) or 0
    total = status.get("replicas", 0) or 0
    if updated < desired:
        return f"{updated}/{desired} replicas run the new spec"
    if total > updated:
        return f"{total - updated} replica(s) of the previous spec still running"
    return None


def _phase(seen: Observed, ready: int, desired: int) -> tuple[str, str, str]:
    """The phase, the Ready condition's reason, and a message a user can act on."""
    if seen.problems:
        return "Failed", "Failed", "; ".join(seen.problems)
    if seen.deployment is None:
        if seen.warnings:
            return "Degraded", "Degraded", "; ".join(seen.warnings)
        return "Pending", "Pending", "creating the Deployment"
    progressing = _mirror(seen.deployment, "Progressing")
    if progressing[1] == "ProgressDeadlineExceeded":
        return "Degraded", "Degraded", f"rollout stalled: {progressing[2]}"
    if seen.warnings:
        return "Degraded", "Degraded", "; ".join(seen.warnings)
    pending = rollout_pending(seen.deployment, desired)
    if desired == 0:
        if pending:
            return "Progressing", "RolloutInProgress", f"scaling to zero: {pending}"
        scaling = seen.spec.get("autoscaling") or {}
        if "keda" in scaling:
            return "ScaledToZero", "ScaledToZero", "scaled to zero by KEDA; load wakes it"
        return "ScaledToZero", "ScaledToZero", "scaled to zero replicas"
    if ready == 0:
        return "Progressing", "Progressing", f"0/{desired} replicas ready (loading the model)"
    if seen.probe is not None and not seen.probe.ok:
        return "Degraded", "Degraded", f"pods are ready but the model is not: {seen.probe.message}"
    if ready < desired:
        if pending or progressing[1] in ROLLING_REASONS:
            return "Progressing", "RolloutInProgress", f"{ready}/{desired} replicas ready"
        return "Degraded", "Degraded", f"{ready}/{desired} replicas ready"
    if pending:
        return "Progressing", "RolloutInProgress", f"rollout in progress: {pending}"
    available = seen.deployment.get("status", {}).get("availableReplicas", 0) or 0
    if available < desired:
        message = f"{available}/{desired} replicas available"
        return "Progressing", "RolloutInProgress", f"rollout in progress: {message}"
    served = manifests.served_model_name(seen.name, seen.spec)
    message = f"{ready}/{desired} replicas ready, serving {served!r}"
    if seen.skipped:
        message += f" (skipped: {'; '.join(seen.skipped)})"
    return "Ready", "Ready", message


def _model_ready(seen: Observed, ready: int) -> tuple[str, str, str]:
    if seen.problems:
        return "False", "InvalidSpec", "the spec is invalid"
    if ready == 0:
        return "False", "NoReadyReplicas", "no replica is ready to answer"
    if seen.probe is None:
        return "Unknown", "NotProbed", "the operator has not probed the Service yet"
    return ("True" if seen.probe.ok else "False"), seen.probe.reason, seen.probe.message


def build(seen: Observed, previous: list[dict[str, Any]], now: str) -> dict[str, Any]:
    """The full status; a condition keeps its lastTransitionTime while its status holds."""
    dep_status = (seen.deployment or {}).get("status", {})
    ready = dep_status.get("readyReplicas", 0) or 0
    desired = seen.spec["replicas"]
    phase, reason, message = _phase(seen, ready, desired)
    wanted = {
        "Available": _mirror(seen.deployment, "Available"),
        "Progressing": _mirror(seen.deployment, "Progressing"),
        "ModelReady": _model_ready(seen, ready),
        "Ready": ("True" if phase == "Ready" else "False", reason, message),
        "APIsInstalled": (
            ("False", "NotInstalled", "; ".join(seen.skipped))
            if seen.skipped
            else ("True", "Installed", "every API the spec uses is installed")
        ),
    }
    conditions = []
    for kind, (status, reason, text) in wanted.items():
        old = _condition(previous, kind)
        since = old["lastTransitionTime"] if old and old.get("status") == status else now
        condition = {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": text,
            "lastTransitionTime": since,
        }
        if seen.generation is not None:
            condition["observedGeneration"] = seen.generation
        conditions.append(condition)
    status: dict[str, Any] = {
        "replicas": dep_status.get("replicas", 0) or 0,
        "readyReplicas": ready,
        "selector": manifests.selector_string(seen.name),
        "phase": phase,
        "message": message,
        "endpoint": manifests.endpoint(seen.name, seen.namespace, seen.spec),
        "servedModelName": manifests.served_model_name(seen.name, seen.spec),
        "conditions": conditions,
    }
    if seen.adapters is not None:
        status["adapters"] = seen.adapters
    if seen.generation is not None:
        status["observedGeneration"] = seen.generation
    return status
