"""Rollout-honest status, refused names, failed children, server-side apply and watches,
with the operator (kopf) running against the emulator (emulator.py).

kmock runs no controllers: where a Deployment controller's status matters, the test writes
it, as the controller would; the API server's own behaviour (generation, apply, label
selectors, refusals) is the emulator's.
"""

from __future__ import annotations

import asyncio
import copy
import json
import tracemalloc

import pytest
from operator_harness import (
    DEPLOY_PATH,
    DEPLOYMENTS,
    MD,
    MD_PATH,
    NS,
    READY_DEPLOYMENT_STATUS,
    absent,
    eventually,
    model_deployment,
    obj,
    patch,
    running_operator,
)
from radixserve_operator import manifests
from radixserve_operator import spec as specs

MODELS = {"object": "list", "data": [{"id": "demo", "object": "model"}]}


def condition(status: dict, kind: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == kind)


async def ready(cluster, **spec) -> None:
    cluster["get /health"] << {"status": "ok"}
    cluster["get /v1/models"] << MODELS
    cluster.objects[MD, NS, "demo"] = model_deployment(**spec)
    await eventually(lambda: obj(cluster, DEPLOYMENTS))
    await patch(cluster, f"{DEPLOY_PATH}/demo/status", READY_DEPLOYMENT_STATUS)
    await eventually(lambda: obj(cluster, MD)["status"]["phase"] == "Ready")


async def test_a_spec_change_is_not_ready_until_the_deployment_rolled_it_out(
    cluster, operator
) -> None:
    await ready(cluster)

    await patch(cluster, f"{MD_PATH}/demo", {"spec": {"engine": {"contextLength": 4096}}})
    # The API server bumped the Deployment's generation; its controller has not caught up,
    # so the old pod is still the one that is ready.
    await eventually(lambda: obj(cluster, DEPLOYMENTS)["metadata"]["generation"] == 2)
    status = await eventually(
        lambda: (s := obj(cluster, MD)["status"])["observedGeneration"] == 2 and s
    )
    assert status["phase"] == "Progressing"
    assert (condition(status, "Ready")["status"], condition(status, "Ready")["reason"]) == (
        "False",
        "RolloutInProgress",
    )

    # The controller rolls generation 2 out: now, and only now, it is Ready.
    rolled = copy.deepcopy(READY_DEPLOYMENT_STATUS)
    rolled["status"]["observedGeneration"] = 2
    await patch(cluster, f"{DEPLOY_PATH}/demo/status", rolled)
    status = await eventually(lambda: (s := obj(cluster, MD)["status"])["phase"] == "Ready" and s)
    assert status["observedGeneration"] == 2
    # A surge rollout (new pod up, old one still serving) is covered by the pure status
    # tests in test_operator_status.py.


def dry_runs(cluster) -> int:
    """The operator's dry-run applies of the Deployment: one per reconcile."""
    return sum(
        1
        for r in cluster
        if r.params.get("dryRun") == "All" and r.url.path == f"{DEPLOY_PATH}/demo"
    )


async def test_one_spec_change_is_one_deployment_generation(cluster, operator) -> None:
    """The operator applies each spec once: no stale body re-applies an older spec (which
    would roll the pods back and forth) and no resync bumps the generation."""
    await ready(cluster)
    await patch(cluster, f"{MD_PATH}/demo", {"spec": {"engine": {"contextLength": 4096}}})
    await eventually(lambda: obj(cluster, MD)["status"]["observedGeneration"] == 2)

    seen = dry_runs(cluster)
    await eventually(lambda: dry_runs(cluster) >= seen + 4, timeout=20)  # several resyncs

    generations = [
        v["metadata"]["generation"] for v in cluster.objects[DEPLOYMENTS, NS, "demo"].history
    ]
    assert sorted(set(generations)) == [1, 2]
    args = obj(cluster, DEPLOYMENTS)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--context-length") + 1] == "4096"
    assert obj(cluster, MD)["metadata"]["generation"] == 2


async def test_a_name_no_service_may_carry_fails_with_the_reason(cluster, operator) -> None:
    cluster.objects[MD, NS, "llama-3.1-8b"] = model_deployment("llama-3.1-8b")

    status = await eventually(lambda: obj(cluster, MD, "llama-3.1-8b").get("status"))
    assert status["phase"] == "Failed"
    assert "DNS-1035 label" in status["message"] and "'llama-3-1-8b'" in status["message"]
    assert absent(cluster, DEPLOYMENTS, "llama-3.1-8b")


async def test_a_refused_child_is_reported_and_the_others_still_apply(cluster, operator) -> None:
    def refuse_services(request, live, new):
        # As the API server would refuse a Service it cannot admit.
        if new.get("kind") == "Service":
            return 422, 'Service "demo" is invalid: metadata.name: Invalid value'

    cluster.admission.append(refuse_services)
    cluster.objects[MD, NS, "demo"] = model_deployment()

    status = await eventually(
        lambda: (s := obj(cluster, MD).get("status")) and s["phase"] == "Degraded" and s
    )
    assert "applying Service demo: 422" not in status["message"]  # the words, not a code
    assert 'applying Service demo: Service "demo" is invalid' in status["message"]
    assert not absent(cluster, DEPLOYMENTS)
    assert not absent(cluster, "policy/v1/poddisruptionbudgets")
    assert absent(cluster, "v1/services")


async def test_an_immutable_cache_change_does_not_stop_reconciling(cluster, operator) -> None:
    cluster.objects[MD, NS, "demo"] = model_deployment(
        model={"huggingFace": {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct"}},
        modelCache={"size": "10Gi"},
    )
    await eventually(lambda: obj(cluster, "v1/persistentvolumeclaims", "demo-model-cache"))

    # Admission off (objects from before the CEL rule): the operator itself must cope.
    await patch(
        cluster,
        f"{MD_PATH}/demo",
        {
            "spec": {"replicas": 2, "modelCache": {"accessMode": "ReadWriteMany"}},
        },
    )

    await eventually(lambda: obj(cluster, DEPLOYMENTS)["spec"]["replicas"] == 2)
    status = await eventually(
        lambda: (s := obj(cluster, MD)["status"])["phase"] == "Degraded" and s
    )
    assert "modelCache.accessMode cannot change" in status["message"]
    pvc = obj(cluster, "v1/persistentvolumeclaims", "demo-model-cache")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


def writes(cluster) -> list[str]:
    """The operator's writes to children (not dry runs) so far."""
    return [
        f"{r.method} {r.url.path}"
        for r in cluster
        if r.headers.get("User-Agent", "") == "radixserve-operator"
        and str(r.method.value).upper() in ("POST", "PUT", "PATCH", "DELETE")
        and r.params.get("dryRun") != "All"
        and "/modeldeployments/" not in r.url.path
    ]


async def test_a_resync_of_an_unchanged_model_sends_no_write(cluster, operator) -> None:
    # "0.5" is stored as "500m" by the API server: a client-side comparison never matched.
    await ready(cluster, resources={"requests": {"cpu": "0.5", "memory": "1Gi"}})
    deployment = obj(cluster, DEPLOYMENTS)
    assert (
        deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]
        == "500m"
    )
    await asyncio.sleep(1.0)
    before = len(writes(cluster))

    await asyncio.sleep(2.0)  # four resyncs

    assert writes(cluster)[before:] == []


async def test_fields_another_controller_added_survive_the_apply(cluster, operator) -> None:
    await ready(cluster)
    # Another controller (a mesh injector) adds a sidecar with its own apply.
    live = obj(cluster, DEPLOYMENTS)
    sidecar = {"name": "mesh-proxy", "image": "proxy:1"}
    live["spec"]["template"]["spec"]["containers"].append(sidecar)
    cluster.objects[DEPLOYMENTS, NS, "demo"].history.append(live)

    await patch(cluster, f"{MD_PATH}/demo", {"spec": {"replicas": 2}})

    await eventually(lambda: obj(cluster, DEPLOYMENTS)["spec"]["replicas"] == 2)
    names = [c["name"] for c in obj(cluster, DEPLOYMENTS)["spec"]["template"]["spec"]["containers"]]
    assert names == ["server", "mesh-proxy"]


def unrelated_deployment(name: str) -> dict:
    """A Deployment the operator has nothing to do with, as big as a real one: built like
    the operator's own (about 2.4 KB of JSON), under another app's labels."""
    deployment = manifests.deployment(name, NS, specs.with_defaults({}))
    deployment["metadata"].update(labels={"app": name}, uid=f"uid-{name}", resourceVersion="1")
    return deployment


@pytest.fixture
def crowded(cluster):
    """1,000 unrelated Deployments, there before the operator starts."""
    for index in range(1000):
        name = f"other-{index}"
        cluster.objects[DEPLOYMENTS, NS, name] = unrelated_deployment(name)
    return cluster


def parsed_size(payload: bytes) -> int:
    """Bytes of Python objects a JSON list becomes once parsed: kopf parses each list
    response whole (no paging unless told) before it walks the items."""
    tracemalloc.start()
    try:
        items = json.loads(payload)
        size = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del items
    return size


async def list_deployments(cluster, selector: str | None) -> bytes:
    params = {"labelSelector": selector} if selector else {}
    async with cluster.get("/apis/apps/v1/deployments", params=params) as response:
        assert response.status == 200
        return await response.read()


async def test_child_watches_are_filtered_by_the_api_server(crowded, record_property) -> None:
    """The memory figure of item 8: what the operator's Deployment watch receives among
    1,000 unrelated Deployments, then the same operator without the selector."""
    cluster = crowded
    selector = "app.kubernetes.io/managed-by=radixserve-operator"
    cluster.objects[MD, NS, "demo"] = model_deployment()
    async with running_operator(cluster):
        await eventually(lambda: obj(cluster, DEPLOYMENTS))
        await eventually(lambda: cluster.delivered[DEPLOYMENTS] > 0)
        await asyncio.sleep(1.0)  # resyncs and child events come and go
    child_reads = [
        r
        for r in cluster
        if r.headers.get("User-Agent", "").startswith("kopf/")
        and r.url.path.endswith(("/deployments", "/services"))
    ]
    assert child_reads
    for request in child_reads:
        assert request.params.get("labelSelector") == selector
    received = cluster.delivered[DEPLOYMENTS]
    received_bytes = cluster.delivered_bytes[DEPLOYMENTS]
    own_bytes = len(json.dumps(obj(cluster, DEPLOYMENTS)))

    # As it ran before: every Deployment in the cluster streams in, to be dropped by kopf.
    async with running_operator(cluster, server_side_selectors=False):
        await eventually(lambda: cluster.delivered[DEPLOYMENTS] - received >= 1001, timeout=30)
    unfiltered = cluster.delivered[DEPLOYMENTS] - received
    unfiltered_bytes = cluster.delivered_bytes[DEPLOYMENTS] - received_bytes

    # kopf holds a whole list response at once: what each list becomes in memory.
    ours = await list_deployments(cluster, selector)
    everything = await list_deployments(cluster, None)
    figures = {
        "watch_objects_filtered": received,
        "watch_objects_unfiltered": unfiltered,
        "watch_bytes_filtered": received_bytes,
        "watch_bytes_unfiltered": unfiltered_bytes,
        "list_parsed_bytes_filtered": parsed_size(ours),
        "list_parsed_bytes_unfiltered": parsed_size(everything),
    }
    for name, value in figures.items():
        record_property(name, value)
    print(f"\n1,000 unrelated Deployments: {figures}")

    # Only the operator's own Deployment crossed the wire: its create and a few changes.
    assert received <= 5, cluster.delivered
    assert received_bytes <= 5 * own_bytes
    assert received_bytes * 100 < unfiltered_bytes
    assert figures["list_parsed_bytes_filtered"] * 100 < figures["list_parsed_bytes_unfiltered"]
