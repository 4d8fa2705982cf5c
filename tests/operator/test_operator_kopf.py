"""The operator running for real (kopf) against kmock as the Kubernetes API."""

from __future__ import annotations

import asyncio

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
)

OWNER = {
    "apiVersion": "radixserve.dev/v1alpha1",
    "kind": "ModelDeployment",
    "name": "demo",
    "uid": "uid-demo",
    "controller": True,
    "blockOwnerDeletion": True,
}


async def test_create_applies_owned_deployment_and_service(cluster, operator) -> None:
    cluster.objects[MD, NS, "demo"] = model_deployment(replicas=2)

    deployment = await eventually(lambda: obj(cluster, DEPLOYMENTS))
    service = await eventually(lambda: obj(cluster, "v1/services"))
    pdb = await eventually(lambda: obj(cluster, "policy/v1/poddisruptionbudgets"))
    for child in (deployment, service, pdb):
        assert child["metadata"]["ownerReferences"] == [OWNER]
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "radixserve-operator"
    assert deployment["spec"]["replicas"] == 2
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--served-model-name") + 1] == "demo"
    assert "--model" not in args  # no source: the server's built-in default model
    assert service["spec"]["ports"][0]["targetPort"] == "http"

    status = await eventually(lambda: obj(cluster, MD)["status"])
    assert status["phase"] == "Progressing"
    assert status["endpoint"] == "http://demo.default.svc.cluster.local:80/v1"
    assert status["selector"] == "app.kubernetes.io/name=radixserve,app.kubernetes.io/instance=demo"


async def test_spec_change_patches_the_deployment(cluster, operator) -> None:
    cluster.objects[MD, NS, "demo"] = model_deployment(nodeSelector={"pool": "cpu"})
    await eventually(lambda: obj(cluster, DEPLOYMENTS)["spec"]["template"]["spec"]["nodeSelector"])

    await patch(
        cluster,
        f"{MD_PATH}/demo",
        {
            "spec": {"replicas": 3, "engine": {"contextLength": 4096}, "nodeSelector": None},
        },
    )

    def rolled() -> bool:
        deployment = obj(cluster, DEPLOYMENTS)
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        return deployment["spec"]["replicas"] == 3 and "--context-length" in args

    await eventually(rolled)
    pod_spec = obj(cluster, DEPLOYMENTS)["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod_spec  # removed from the spec, so removed from the pods
    args = pod_spec["containers"][0]["args"]
    assert args[args.index("--context-length") + 1] == "4096"


async def test_ready_deployment_and_answering_model_make_it_ready(cluster, operator) -> None:
    cluster["get /health"] << {"status": "ok"}
    cluster["get /v1/models"] << {"object": "list", "data": [{"id": "demo", "object": "model"}]}
    cluster.objects[MD, NS, "demo"] = model_deployment()
    await eventually(lambda: obj(cluster, DEPLOYMENTS))

    await patch(cluster, f"{DEPLOY_PATH}/demo/status", READY_DEPLOYMENT_STATUS)

    status = await eventually(lambda: (s := obj(cluster, MD)["status"])["phase"] == "Ready" and s)
    assert status["readyReplicas"] == 1
    assert status["observedGeneration"] == 1
    assert status["endpoint"] == "http://demo.default.svc.cluster.local:80/v1"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert {kind: c["status"] for kind, c in conditions.items()} == {
        "Available": "True",
        "Progressing": "True",
        "ModelReady": "True",
        "Ready": "True",
        "APIsInstalled": "True",
    }
    assert conditions["ModelReady"]["reason"] == "Serving"


async def test_ready_pods_without_the_model_listed_are_degraded(cluster, operator) -> None:
    cluster["get /health"] << {"status": "ok"}
    cluster["get /v1/models"] << {"object": "list", "data": [{"id": "other"}]}
    cluster.objects[MD, NS, "demo"] = model_deployment()
    await eventually(lambda: obj(cluster, DEPLOYMENTS))

    await patch(cluster, f"{DEPLOY_PATH}/demo/status", READY_DEPLOYMENT_STATUS)

    status = await eventually(
        lambda: (s := obj(cluster, MD)["status"])["phase"] == "Degraded" and s
    )
    model_ready = next(c for c in status["conditions"] if c["type"] == "ModelReady")
    assert (model_ready["status"], model_ready["reason"]) == ("False", "ModelNotListed")
    assert "'demo'" in status["message"]


async def test_tensor_parallel_mismatch_fails_without_applying(cluster, operator) -> None:
    cluster.objects[MD, NS, "demo"] = model_deployment(resources={"gpus": 1}, tensorParallelSize=2)

    status = await eventually(lambda: obj(cluster, MD).get("status"))
    assert status["phase"] == "Failed"
    assert "tensorParallelSize (2) must equal resources.gpus (1)" in status["message"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Failed")
    assert absent(cluster, DEPLOYMENTS)


async def test_missing_api_key_secret_is_degraded_with_the_fix(cluster, operator) -> None:
    cluster.objects[MD, NS, "demo"] = model_deployment(apiKeySecretRef={"name": "demo-key"})

    status = await eventually(
        lambda: (s := obj(cluster, MD).get("status")) and s["phase"] == "Degraded" and s
    )
    assert "Secret 'demo-key' not found" in status["message"]
    assert (
        "kubectl -n default create secret generic demo-key --from-literal=api-key="
        in (status["message"])
    )
    env = obj(cluster, DEPLOYMENTS)["spec"]["template"]["spec"]["containers"][0]["env"]
    key_ref = {"secretKeyRef": {"name": "demo-key", "key": "api-key"}}
    assert {"name": "RADIXSERVE_API_KEY", "valueFrom": key_ref} in env


async def test_hand_edits_to_the_deployment_are_put_back(cluster, operator) -> None:
    cluster.objects[MD, NS, "demo"] = model_deployment(replicas=2)
    await eventually(lambda: obj(cluster, DEPLOYMENTS))

    await patch(cluster, f"{DEPLOY_PATH}/demo", {"spec": {"replicas": 7}})

    await eventually(lambda: obj(cluster, DEPLOYMENTS)["spec"]["replicas"] == 2)


async def test_optional_children_follow_the_spec(cluster, operator) -> None:
    cluster.objects[MD, NS, "demo"] = model_deployment(
        model={"huggingFace": {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct"}},
        autoscaling={"minReplicas": 1, "maxReplicas": 4},
        modelCache={"size": "10Gi", "accessMode": "ReadWriteMany"},
        inferencePool={"endpointPickerRef": {"name": "demo-epp", "port": 9002}},
    )
    hpa = await eventually(lambda: obj(cluster, "autoscaling/v2/horizontalpodautoscalers"))
    pool = await eventually(lambda: obj(cluster, "inference.networking.k8s.io/v1/inferencepools"))
    pvc = await eventually(lambda: obj(cluster, "v1/persistentvolumeclaims", "demo-model-cache"))
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "radixserve.dev/v1alpha1",
        "kind": "ModelDeployment",
        "name": "demo",
    }
    assert pool["spec"]["targetPorts"] == [{"number": 30000}]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "10Gi"
    for child in (hpa, pool, pvc):
        assert child["metadata"]["ownerReferences"][0]["uid"] == "uid-demo"

    await patch(cluster, f"{MD_PATH}/demo", {"spec": {"autoscaling": None}})

    await eventually(lambda: absent(cluster, "autoscaling/v2/horizontalpodautoscalers"))
    assert not absent(cluster, "inference.networking.k8s.io/v1/inferencepools")


async def test_deletion_releases_the_finalizer(cluster, operator) -> None:
    cluster.objects[MD, NS, "demo"] = model_deployment()
    await eventually(lambda: obj(cluster, MD)["metadata"].get("finalizers"))
    await eventually(lambda: obj(cluster, DEPLOYMENTS))

    async with cluster.delete(f"{MD_PATH}/demo") as response:
        assert response.status == 200

    await eventually(lambda: absent(cluster, MD))
    # Kubernetes' garbage collector removes the children through their owner reference;
    # kmock runs no collector, so the reference itself is what is checked.
    assert obj(cluster, DEPLOYMENTS)["metadata"]["ownerReferences"][0]["uid"] == "uid-demo"


async def test_missing_inference_pool_crd_skips_the_pool_and_still_serves(
    cluster, operator
) -> None:
    # The Inference Extension's CRDs are not installed: discovery does not list them.
    del cluster.resources["inference.networking.k8s.io/v1/inferencepools"]
    cluster["get /health"] << {"status": "ok"}
    cluster["get /v1/models"] << {"object": "list", "data": [{"id": "demo", "object": "model"}]}
    cluster.objects[MD, NS, "demo"] = model_deployment(inferencePool={"gateway": {"name": "gw"}})
    await eventually(lambda: obj(cluster, DEPLOYMENTS))
    await patch(cluster, f"{DEPLOY_PATH}/demo/status", READY_DEPLOYMENT_STATUS)

    status = await eventually(lambda: (s := obj(cluster, MD)["status"])["phase"] == "Ready" and s)
    skipped = next(c for c in status["conditions"] if c["type"] == "APIsInstalled")
    assert skipped["status"] == "False"
    assert (
        "inferencePool: skipped, the InferencePool API (inference.networking.k8s.io/v1)"
        in (skipped["message"])
    )
    assert "skipped" in status["message"]
    # The picker and its RBAC serve only the pool: none of them was created.
    assert absent(cluster, DEPLOYMENTS, "demo-epp")
    assert absent(cluster, "v1/serviceaccounts", "demo-epp")
    assert absent(cluster, "rbac.authorization.k8s.io/v1/roles", "demo-epp")
    assert not absent(cluster, "v1/services")


async def test_operator_restart_resumes_and_reapplies(cluster, operator) -> None:
    # A ModelDeployment an earlier operator run already handled: kopf resumes it.
    handled = model_deployment(replicas=2)
    handled["metadata"]["annotations"] = {
        "radixserve.dev/last-handled-configuration": '{"spec":{"replicas":2}}\n'
    }
    cluster.objects[MD, NS, "demo"] = handled

    deployment = await eventually(lambda: obj(cluster, DEPLOYMENTS))
    assert deployment["spec"]["replicas"] == 2


async def test_a_longer_drain_rolls_the_flag_and_the_grace_period_together(
    cluster, operator
) -> None:
    cluster.objects[MD, NS, "demo"] = model_deployment()
    pod = (await eventually(lambda: obj(cluster, DEPLOYMENTS)))["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 5 + 30 + 15

    await patch(
        cluster,
        f"{MD_PATH}/demo",
        {"spec": {"engine": {"shutdownTimeoutSeconds": 120}}},
    )

    def drain_of(pod: dict) -> tuple[str, int]:
        args = pod["containers"][0]["args"]
        return args[args.index("--shutdown-timeout") + 1], pod["terminationGracePeriodSeconds"]

    await eventually(
        lambda: drain_of(obj(cluster, DEPLOYMENTS)["spec"]["template"]["spec"]) == ("120", 140)
    )
    pod = obj(cluster, DEPLOYMENTS)["spec"]["template"]["spec"]
    assert pod["containers"][0]["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}


async def test_extra_args_that_take_over_the_drain_are_refused(cluster, operator) -> None:
    cluster.objects[MD, NS, "demo"] = model_deployment(
        engine={"extraArgs": ["--shutdown-timeout", "600"]}
    )

    status = await eventually(lambda: obj(cluster, MD).get("status"))
    assert status["phase"] == "Failed"
    assert "engine.extraArgs must not set --shutdown-timeout" in status["message"]
    assert absent(cluster, DEPLOYMENTS)


async def test_deletion_is_not_held_up_by_a_resync_in_flight(cluster, operator) -> None:
    """kopf keeps the finalizer until the resync timer has exited; one caught mid-probe used
    to be rechecked only after kopf's default 60 s."""

    async def slow_health(request) -> dict:
        await asyncio.sleep(1.5)  # within the probe's timeout: busy, not failing
        return {"status": "ok"}

    cluster["get /health"] << slow_health
    cluster["get /v1/models"] << {"object": "list", "data": [{"id": "demo", "object": "model"}]}
    cluster.objects[MD, NS, "demo"] = model_deployment()
    await eventually(lambda: obj(cluster, DEPLOYMENTS))
    await patch(cluster, f"{DEPLOY_PATH}/demo/status", READY_DEPLOYMENT_STATUS)
    await eventually(lambda: obj(cluster, MD)["status"]["phase"] == "Ready")

    async with cluster.delete(f"{MD_PATH}/demo") as response:
        assert response.status == 200

    await eventually(lambda: absent(cluster, MD), timeout=20)
