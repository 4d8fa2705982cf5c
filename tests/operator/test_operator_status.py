"""Status and apply logic as pure functions: phases, conditions, idempotent patches."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from radixserve_operator import manifests, reconcile, status
from radixserve_operator.spec import with_defaults


def deployment(ready: int, replicas: int, progressing: str = "NewReplicaSetAvailable") -> dict:
    return {
        "status": {
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": replicas,
            "conditions": [
                {"type": "Available", "status": "True" if ready else "False", "reason": "R"},
                {"type": "Progressing", "status": "True", "reason": progressing, "message": "m"},
            ],
        }
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
        (deployment(0, 0), 0, "Pending"),
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


def test_covers_ignores_server_added_fields_but_not_changes() -> None:
    desired = {"spec": {"replicas": 2, "template": {"containers": [{"name": "s", "args": ["a"]}]}}}
    live = {
        "metadata": {"uid": "u"},
        "spec": {"replicas": 2, "template": {"containers": [{"name": "s", "args": ["a"], "x": 1}]}},
    }
    assert reconcile.covers(live, desired)
    live["spec"]["replicas"] = 7
    assert not reconcile.covers(live, desired)
    assert reconcile.covers({"cpu": "2"}, {"cpu": 2})  # quantities come back as strings


def test_merge_patch_deletes_what_the_last_apply_set_and_this_one_does_not() -> None:
    before = with_defaults({"nodeSelector": {"pool": "gpu"}})
    after = with_defaults({})
    live = reconcile.with_last_applied(manifests.deployment("demo", "ml", before))
    desired = reconcile.with_last_applied(manifests.deployment("demo", "ml", after))
    patch = reconcile.merge_patch(live, desired)
    assert patch["spec"]["template"]["spec"]["nodeSelector"] is None
    assert patch["spec"]["replicas"] == 1


def test_schema_validation_would_catch_a_broken_manifest() -> None:
    broken = manifests.deployment("demo", "ml", with_defaults({}))
    broken["spec"]["replica"] = 1  # a typo strict validation must reject
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.33.0", strict=True)
