"""Status and apply logic as pure functions: phases, conditions, idempotent patches."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from radixserve_operator import manifests, reconcile, status
from radixserve_operator.spec import with_defaults


def deployment(
    ready: int,
    replicas: int,
    progressing: str = "NewReplicaSetAvailable",
    generation: int = 1,
    observed: int = 1,
    updated: int | None = None,
    total: int | None = None,
) -> dict:
    """A Deployment as its controller reports it (kmock runs no controller)."""
    return {
        "metadata": {"generation": generation},
        "status": {
            "observedGeneration": observed,
            "replicas": replicas if total is None else total,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "updatedReplicas": replicas if updated is None else updated,
            "conditions": [
                {"type": "Available", "status": "True" if ready else "False", "reason": "R"},
                {"type": "Progressing", "status": "True", "reason": progressing, "message": "m"},
            ],
        },
    }


def observe(dep: dict | None, replicas: int = 1, **kwargs: Any) -> status.Observed:
    fields: dict[str, Any] = {
        "name": "demo",
        "namespace": "ml",
        "generation": 3,
        "spec": with_defaults({"replicas": replicas}),
        "problems": [],
        "warnings": [],
        "deployment": dep,
        "probe": status.Probe(True, "Serving", "ok"),
    } | kwargs
    return status.Observed(**fields)


@pytest.mark.parametrize(
    ("dep", "replicas", "phase"),
    [
        (None, 1, "Pending"),
        (deployment(0, 1, "ReplicaSetUpdated"), 1, "Progressing"),
        (deployment(1, 1), 1, "Ready"),
        (deployment(1, 3, "ReplicaSetUpdated"), 3, "Progressing"),
        (deployment(1, 3), 3, "Degraded"),
        (deployment(0, 1, "ProgressDeadlineExceeded"), 1, "Degraded"),
        (deployment(0, 0), 0, "ScaledToZero"),
    ],
)
def test_phase(dep: dict | None, replicas: int, phase: str) -> None:
    built = status.build(observe(dep, replicas), [], "2026-01-01T00:00:00Z")
    assert built["phase"] == phase
    ready = next(c for c in built["conditions"] if c["type"] == "Ready")
    assert ready["status"] == ("True" if phase == "Ready" else "False")
    assert ready["observedGeneration"] == 3


def test_problems_win_over_everything() -> None:
    seen = observe(deployment(1, 1), problems=["tensorParallelSize (2) must equal ..."])
    built = status.build(seen, [], "t")
    assert built["phase"] == "Failed"
    assert built["message"].startswith("tensorParallelSize")


def test_transition_time_moves_only_when_the_status_flips() -> None:
    first = status.build(observe(deployment(0, 1, "ReplicaSetUpdated")), [], "t1")
    same = status.build(observe(deployment(0, 1, "ReplicaSetUpdated")), first["conditions"], "t2")
    flipped = status.build(observe(deployment(1, 1)), same["conditions"], "t3")
    times = {c["type"]: c["lastTransitionTime"] for c in same["conditions"]}
    assert times["Ready"] == "t1"
    flipped_times = {c["type"]: c["lastTransitionTime"] for c in flipped["conditions"]}
    assert flipped_times["Ready"] == "t3"
    assert flipped_times["Progressing"] == "t1"  # still True: unchanged


def test_status_carries_what_kubectl_and_the_hpa_read() -> None:
    built = status.build(observe(deployment(2, 2), 2), [], "t")
    assert built["selector"] == manifests.selector_string("demo")
    assert built["endpoint"] == "http://demo.ml.svc.cluster.local:80/v1"
    assert built["servedModelName"] == "demo"
    assert (built["replicas"], built["readyReplicas"], built["observedGeneration"]) == (2, 2, 3)


def ready_condition(built: dict) -> dict:
    return next(c for c in built["conditions"] if c["type"] == "Ready")


def test_a_spec_change_not_yet_observed_is_a_rollout_not_ready() -> None:
    """Right after a spec change the old pods are all ready, but they run the old spec."""
    built = status.build(observe(deployment(1, 1, generation=2, observed=1)), [], "t")
    assert built["phase"] == "Progressing"
    ready = ready_condition(built)
    assert (ready["status"], ready["reason"]) == ("False", "RolloutInProgress")
    assert "generation 2" in built["message"]


@pytest.mark.parametrize(
    ("dep", "why"),
    [
        # maxSurge 1: the new pod is up, the old one still serves (3 pods for 2 desired).
        (deployment(2, 2, "ReplicaSetUpdated", 2, 2, updated=1, total=3), "1/2 replicas run"),
        (deployment(2, 2, "ReplicaSetUpdated", 2, 2, updated=2, total=3), "previous spec"),
    ],
)
def test_a_surge_rollout_is_not_ready_until_only_new_pods_serve(dep: dict, why: str) -> None:
    built = status.build(observe(dep, 2), [], "t")
    assert built["phase"] == "Progressing" and why in built["message"]
    assert ready_condition(built)["reason"] == "RolloutInProgress"


def test_ready_pods_not_yet_available_are_still_rolling_out() -> None:
    dep = deployment(1, 1)
    dep["status"]["availableReplicas"] = 0  # minReadySeconds not passed yet
    assert status.build(observe(dep), [], "t")["phase"] == "Progressing"


def test_rolled_out_is_ready() -> None:
    built = status.build(observe(deployment(2, 2, generation=2, observed=2), 2), [], "t")
    assert built["phase"] == "Ready"
    assert (ready_condition(built)["status"], ready_condition(built)["reason"]) == ("True", "Ready")


def test_same_object_ignores_bookkeeping_but_not_changes() -> None:
    live = {
        "metadata": {"name": "d", "resourceVersion": "5", "generation": 2, "managedFields": [1]},
        "spec": {"replicas": 2, "cpu": "500m"},
        "status": {"readyReplicas": 2},
    }
    would_be = {
        "metadata": {"name": "d", "resourceVersion": "5", "generation": 2, "managedFields": [2]},
        "spec": {"replicas": 2, "cpu": "500m"},
        "status": {"readyReplicas": 2},
    }
    assert reconcile.same_object(live, would_be)
    would_be["spec"]["replicas"] = 3
    assert not reconcile.same_object(live, would_be)


def test_a_pvc_access_mode_change_is_named_instead_of_patched() -> None:
    spec = with_defaults({"modelCache": {"size": "10Gi"}})
    live = manifests.model_cache_pvc("demo", "ml", spec)
    assert reconcile.pvc_immutable_change(live, live) is None
    changed = with_defaults({"modelCache": {"size": "10Gi", "accessMode": "ReadWriteMany"}})
    why = reconcile.pvc_immutable_change(live, manifests.model_cache_pvc("demo", "ml", changed))
    assert why and "modelCache.accessMode cannot change" in why and "delete the PVC" in why
    bigger = with_defaults({"modelCache": {"size": "20Gi"}})
    assert (
        reconcile.pvc_immutable_change(live, manifests.model_cache_pvc("demo", "ml", bigger))
        is None
    )


def test_schema_validation_would_catch_a_broken_manifest() -> None:
    broken = manifests.deployment("demo", "ml", with_defaults({}))
    broken["spec"]["replica"] = 1  # a typo strict validation must reject
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.33.0", strict=True)
