"""The operator running for real (kopf) against kmock as the Kubernetes API."""

from __future__ import annotations

from operator_harness import (
    DEPLOYMENTS,
    MD,
    NS,
    eventually,
    model_deployment,
    obj,
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
