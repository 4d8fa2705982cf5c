"""Issue 16's stack: the endpoint picker with its pool and route, multi-node through a
LeaderWorkerSet, KEDA scaling to zero, and LoRA adapters reconciled on running pods.

Manifests are checked against the projects' CRD schemas (tests/operator/crd_schemas, each
file naming its source and version) and pod templates against Kubernetes' own; the
operator runs (kopf) against kmock, and adapters are loaded on a real HTTP server on
127.0.0.1 that implements the server's load/unload contract.
"""

from __future__ import annotations

import argparse
import base64
import pathlib
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import jsonschema
import kubernetes_validate
import pytest
import yaml
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
from radixserve.config import ServerArgs
from radixserve_operator import manifests
from radixserve_operator.spec import with_defaults

SCHEMAS = pathlib.Path(__file__).parent / "crd_schemas"
K8S_VERSION = "1.33.0"
LWS = "leaderworkerset.x-k8s.io/v1/leaderworkersets"
LWS_PATH = f"/apis/leaderworkerset.x-k8s.io/v1/namespaces/{NS}/leaderworkersets"

PICKER = {"inferencePool": {"gateway": {"name": "gw", "namespace": "infra"}}}
MULTI_NODE = {"resources": {"gpus": 8}, "tensorParallelSize": 16, "parallelism": {"nodes": 2}}
KEDA = {
    "autoscaling": {
        "minReplicas": 0,
        "maxReplicas": 4,
        "targetAverageValue": "8",
        "keda": {"prometheusAddress": "http://prometheus.monitoring:9090"},
    }
}


def build(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The children by "Kind/name"."""
    built = manifests.children("demo", "ml", with_defaults(raw))
    return {f"{m['kind']}/{m['metadata']['name']}": m for m in built}


def crd_schema(kind: str) -> dict[str, Any]:
    (found,) = [
        doc
        for path in SCHEMAS.glob("*.yaml")
        if (doc := yaml.safe_load(path.read_text()))["kind"] == kind
    ]
    assert found["source"], "each schema names where it was taken from"
    return found


def check_against_crd(manifest: dict[str, Any]) -> None:
    schema = crd_schema(manifest["kind"])
    assert manifest["apiVersion"] == schema["apiVersion"]
    # CRD schemas are OpenAPI v3.0, i.e. draft-4 semantics.
    jsonschema.Draft4Validator(schema["spec"]).validate(manifest["spec"])


def test_every_optional_kind_passes_its_projects_schema() -> None:
    children = build({**PICKER, **MULTI_NODE, **KEDA}) | build(PICKER)
    kinds = {"InferencePool", "HTTPRoute", "LeaderWorkerSet", "ScaledObject"}
    checked = set()
    for manifest in children.values():
        if manifest["kind"] in kinds:
            check_against_crd(manifest)
            checked.add(manifest["kind"])
        else:
            kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    assert checked == kinds
    # LeaderWorkerSet's pod templates are core/v1's: checked in a Deployment's place.
    lws = children["LeaderWorkerSet/demo"]["spec"]["leaderWorkerTemplate"]
    for template in (lws["leaderTemplate"], lws["workerTemplate"]):
        holder = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "x"},
            "spec": {"selector": {"matchLabels": manifests.selector("demo")}, "template": template},
        }
        kubernetes_validate.validate(holder, K8S_VERSION, strict=True)


def test_the_schemas_refuse_what_their_projects_refuse() -> None:
    pool = build(PICKER)["InferencePool/demo"]
    pool["spec"]["endpointPickerRef"]["failureMode"] = "Sometimes"
    with pytest.raises(jsonschema.ValidationError):
        check_against_crd(pool)
    lws = build(MULTI_NODE)["LeaderWorkerSet/demo"]
    lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"
    with pytest.raises(jsonschema.ValidationError):
        check_against_crd(lws)
    route = build(PICKER)["HTTPRoute/demo"]
    del route["spec"]["parentRefs"][0]["name"]
    with pytest.raises(jsonschema.ValidationError):
        check_against_crd(route)
    scaled = build(KEDA)["ScaledObject/demo"]
    del scaled["spec"]["triggers"]
    with pytest.raises(jsonschema.ValidationError):
        check_against_crd(scaled)


def test_the_pool_names_the_picker_the_operator_runs() -> None:
    children = build(PICKER)
    pool = children["InferencePool/demo"]["spec"]
    assert pool["endpointPickerRef"] == {
        "kind": "Service",
        "name": "demo-epp",
        "port": {"number": manifests.PICKER_GRPC_PORT},
        "failureMode": "FailClose",
    }
    assert pool["selector"]["matchLabels"] == manifests.selector("demo")
    service = children["Service/demo-epp"]["spec"]
    assert service["ports"][0]["port"] == manifests.PICKER_GRPC_PORT
    picker = children["Deployment/demo-epp"]["spec"]["template"]
    args = picker["spec"]["containers"][0]["args"]
    assert args[args.index("--pool-name") + 1] == "demo"
    assert args[args.index("--pool-namespace") + 1] == "ml"
    # The picker reads metrics under its default names, which the server exports.
    assert not [a for a in args if "metric" in a and a != "--metrics-port"]
    assert picker["spec"]["serviceAccountName"] == "demo-epp"
    assert service["selector"] == picker["metadata"]["labels"]
    binding = children["RoleBinding/demo-epp"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "demo-epp", "namespace": "ml"}
    ]
    assert binding["roleRef"]["name"] == children["Role/demo-epp"]["metadata"]["name"]
    # The model's Service, pool and PDB never select the picker's pods.
    serving = manifests.serving_selector("demo", with_defaults(PICKER))
    assert not serving.items() <= picker["metadata"]["labels"].items()
    model_pods = children["Deployment/demo"]["spec"]["template"]["metadata"]["labels"]
    assert serving.items() <= model_pods.items()
    assert model_pods[manifests.ENGINE_TYPE_LABEL] == "vllm"
    route = children["HTTPRoute/demo"]["spec"]
    assert route["parentRefs"] == [
        {
            "group": "gateway.networking.k8s.io",
            "kind": "Gateway",
            "name": "gw",
            "namespace": "infra",
        }
    ]
    assert route["rules"][0]["backendRefs"][0]["kind"] == "InferencePool"


def test_the_picker_image_is_the_specs_or_the_default() -> None:
    def image(raw: dict[str, Any]) -> str:
        return build(raw)["Deployment/demo-epp"]["spec"]["template"]["spec"]["containers"][0][
            "image"
        ]

    assert image(PICKER) == manifests.DEFAULT_PICKER_IMAGE
    assert image({"inferencePool": {"picker": {"image": "epp:v1.1.0"}}}) == "epp:v1.1.0"


def test_a_picker_of_your_own_means_none_is_created() -> None:
    ref = {"name": "shared-epp", "port": 9002, "failureMode": "FailOpen"}
    children = build({"inferencePool": {"endpointPickerRef": ref}})
    assert "Deployment/demo-epp" not in children
    assert "ServiceAccount/demo-epp" not in children
    pool = children["InferencePool/demo"]["spec"]["endpointPickerRef"]
    assert (pool["name"], pool["failureMode"]) == ("shared-epp", "FailOpen")


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_multi_node_is_one_leader_worker_set_group_per_replica() -> None:
    children = build({**MULTI_NODE, "replicas": 3})
    assert "Deployment/demo" not in children
    lws = children["LeaderWorkerSet/demo"]["spec"]
    assert lws["replicas"] == 3
    assert lws["leaderWorkerTemplate"]["size"] == 2
    assert lws["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader = lws["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
    worker = lws["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
    for server in (leader, worker):
        assert flag(server["args"], "--tp-size") == "16"
        assert flag(server["args"], "--nnodes") == "2"
        assert flag(server["args"], "--dist-init-addr") == "$(LWS_LEADER_ADDRESS):29500"
        assert server["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert flag(leader["args"], "--node-rank") == "0"
    assert flag(worker["args"], "--node-rank") == "$(LWS_WORKER_INDEX)"
    # The leader serves HTTP and carries the probes; a worker has neither.
    assert leader["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "readinessProbe" not in worker and "ports" not in worker
    service = children["Service/demo"]["spec"]["selector"]
    assert service[manifests.LWS_WORKER_INDEX_LABEL] == "0"


@pytest.mark.parametrize("template, rank", [("leaderTemplate", 0), ("workerTemplate", 1)])
def test_the_server_reads_each_group_members_flags(template: str, rank: int) -> None:
    """As the kubelet runs them: LeaderWorkerSet's variables expanded, then the real
    `radixserve serve` parser and its checks."""
    lws = build(MULTI_NODE)["LeaderWorkerSet/demo"]["spec"]["leaderWorkerTemplate"]
    server = lws[template]["spec"]["containers"][0]
    env = {"LWS_LEADER_ADDRESS": "demo-0.demo.ml", "LWS_WORKER_INDEX": str(rank)}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in server["args"]]
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    parsed = ServerArgs.from_cli(parser.parse_args(args), environ={})
    assert (parsed.tp_size, parsed.nnodes, parsed.node_rank) == (16, 2, rank)
    assert parsed.dist_init_addr == "demo-0.demo.ml:29500"


def test_keda_replaces_the_hpa_and_may_scale_to_zero() -> None:
    children = build(KEDA)
    assert "HorizontalPodAutoscaler/demo" not in children
    scaled = children["ScaledObject/demo"]["spec"]
    assert scaled["scaleTargetRef"]["kind"] == "ModelDeployment"
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (0, 4)
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["threshold"] == "8"
    assert trigger["metadata"]["activationThreshold"] == "0"
    query = trigger["metadata"]["query"]
    assert "radixserve_num_queue_reqs" in query and "radixserve_num_running_reqs" in query
    assert 'service="demo"' in query and 'namespace="ml"' in query
    assert "HorizontalPodAutoscaler/demo" in build({"autoscaling": {"maxReplicas": 2}})


def test_adapters_reach_new_pods_through_their_args() -> None:
    adapters = [
        {"name": "sql", "source": "hf://org/sql-lora@v2"},
        {"name": "cache", "source": "/models/adapters/chat"},
    ]
    raw = {"adapters": adapters, "engine": {"maxLoras": 4, "maxLoraRank": 64}}
    args = build(raw)["Deployment/demo"]["spec"]["template"]["spec"]["containers"][0]["args"]
    start = args.index("--lora-paths") + 1
    assert args[start : start + 2] == ["sql=hf://org/sql-lora@v2", "cache=/models/adapters/chat"]
    assert flag(args, "--max-loras") == "4" and flag(args, "--max-lora-rank") == "64"
    assert (
        "--lora-paths"
        not in build({})["Deployment/demo"]["spec"]["template"]["spec"]["containers"][0]["args"]
    )


# --- the operator running against kmock ---


async def test_without_leader_worker_set_nothing_is_created(cluster, operator) -> None:
    del cluster.resources[LWS]
    cluster.objects[MD, NS, "demo"] = model_deployment(**MULTI_NODE)

    status = await eventually(
        lambda: (s := obj(cluster, MD).get("status")) and s["phase"] == "Degraded" and s
    )
    assert (
        "the LeaderWorkerSet API (leaderworkerset.x-k8s.io/v1) is not installed"
        in (status["message"])
    )
    assert "nothing was created" in status["message"]
    apis = next(c for c in status["conditions"] if c["type"] == "APIsInstalled")
    assert apis["status"] == "False" and "LeaderWorkerSet" in apis["message"]
    for resource in (DEPLOYMENTS, "v1/services", "policy/v1/poddisruptionbudgets"):
        assert absent(cluster, resource)


async def test_a_ready_leader_worker_set_makes_it_ready(cluster, operator) -> None:
    cluster["get /health"] << {"status": "ok"}
    cluster["get /v1/models"] << {"object": "list", "data": [{"id": "demo", "object": "model"}]}
    cluster.objects[MD, NS, "demo"] = model_deployment(**MULTI_NODE)
    lws = await eventually(lambda: obj(cluster, LWS))
    assert lws["metadata"]["ownerReferences"][0]["uid"] == "uid-demo"
    assert absent(cluster, DEPLOYMENTS)

    ready = {
        "replicas": 1,
        "readyReplicas": 1,
        "updatedReplicas": 1,
        "conditions": [{"type": "Available", "status": "True", "reason": "AllGroupsReady"}],
    }
    await patch(cluster, f"{LWS_PATH}/demo", {"status": ready})

    status = await eventually(lambda: (s := obj(cluster, MD)["status"])["phase"] == "Ready" and s)
    assert status["readyReplicas"] == 1

    # Back to one node: the Deployment takes over and the LeaderWorkerSet goes.
    await patch(
        cluster,
        f"{MD_PATH}/demo",
        {"spec": {"parallelism": None, "resources": None, "tensorParallelSize": None}},
    )
    await eventually(lambda: obj(cluster, DEPLOYMENTS))
    await eventually(lambda: absent(cluster, LWS))


async def test_scaled_to_zero_reads_as_such(cluster, operator) -> None:
    cluster.objects[MD, NS, "demo"] = model_deployment(**KEDA)
    scaled = await eventually(lambda: obj(cluster, "keda.sh/v1alpha1/scaledobjects"))
    assert scaled["spec"]["minReplicaCount"] == 0
    # KEDA wrote 0 through the scale subresource; the Deployment controller scaled down.
    await patch(cluster, f"{MD_PATH}/demo", {"spec": {"replicas": 0}})
    await eventually(lambda: obj(cluster, DEPLOYMENTS)["spec"]["replicas"] == 0)
    zero = {"status": {"observedGeneration": 2, "replicas": 0, "conditions": []}}
    await patch(cluster, f"{DEPLOY_PATH}/demo/status", zero)

    status = await eventually(
        lambda: (s := obj(cluster, MD)["status"])["phase"] == "ScaledToZero" and s
    )
    assert "KEDA" in status["message"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ScaledToZero"


class FakeServer:
    """The server's adapter contract on a real HTTP port: what it was asked, in order."""

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.loaded: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []

    def authorized(self, request: aiohttp.web.Request) -> bool:
        return not self.api_key or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def models(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        if not self.authorized(request):
            return aiohttp.web.json_response({"error": {"message": "no key"}}, status=401)
        data = [{"id": "demo", "object": "model"}]
        data += [{"id": name, "object": "model", "parent": "demo"} for name in self.loaded]
        return aiohttp.web.json_response({"object": "list", "data": data})

    async def load(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        if not self.authorized(request):
            return aiohttp.web.json_response({"error": {"message": "no key"}}, status=401)
        body = await request.json()
        self.calls.append(("load", body["lora_name"]))
        if body["lora_path"].endswith("broken"):
            error = {"message": "not a LoRA adapter", "type": "BadRequestError"}
            return aiohttp.web.json_response({"error": error}, status=400)
        self.loaded[body["lora_name"]] = body["lora_path"]
        return aiohttp.web.json_response({"status": "ok"})

    async def unload(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        if not self.authorized(request):
            return aiohttp.web.json_response({"error": {"message": "no key"}}, status=401)
        name = (await request.json())["lora_name"]
        self.calls.append(("unload", name))
        if self.loaded.pop(name, None) is None:
            return aiohttp.web.json_response({"error": {"message": "unknown"}}, status=404)
        return aiohttp.web.json_response({"status": "ok"})


@pytest.fixture
async def pod_server() -> AsyncIterator[tuple[FakeServer, int]]:
    server = FakeServer(api_key="s3cret")
    app = aiohttp.web.Application()
    app.router.add_get("/v1/models", server.models)
    app.router.add_post("/load_lora_adapter", server.load)
    app.router.add_post("/unload_lora_adapter", server.unload)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield server, port
    finally:
        await runner.cleanup()


def ready_pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": manifests.pod_labels("demo")},
        "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
    }


async def test_adapters_follow_the_list_on_running_pods(cluster, operator, pod_server) -> None:
    server, port = pod_server
    operator.pod_port = port
    cluster["get /health"] << {"status": "ok"}
    cluster["get /v1/models"] << {"object": "list", "data": [{"id": "demo", "object": "model"}]}
    cluster.objects["v1/secrets", NS, "key"] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "key", "namespace": NS},
        "data": {"api-key": base64.b64encode(b"s3cret").decode()},
    }
    cluster.objects["v1/pods", NS, "demo-0"] = ready_pod("demo-0")
    sql = {"name": "sql", "source": "hf://org/sql-lora"}
    cluster.objects[MD, NS, "demo"] = model_deployment(
        apiKeySecretRef={"name": "key"}, adapters=[sql]
    )
    await eventually(lambda: obj(cluster, DEPLOYMENTS))
    await patch(cluster, f"{DEPLOY_PATH}/demo/status", READY_DEPLOYMENT_STATUS)

    status = await eventually(lambda: (s := obj(cluster, MD)["status"])["phase"] == "Ready" and s)
    await eventually(lambda: obj(cluster, MD)["status"].get("adapters") == [sql])
    assert server.loaded == {"sql": "hf://org/sql-lora"}
    assert status["phase"] == "Ready"

    # A new list: chat is loaded, sql unloaded, on the running pod.
    chat = {"name": "chat", "source": "/models/adapters/chat"}
    await patch(cluster, f"{MD_PATH}/demo", {"spec": {"adapters": [chat]}})
    await eventually(lambda: obj(cluster, MD)["status"].get("adapters") == [chat])
    assert server.loaded == {"chat": "/models/adapters/chat"}
    assert ("unload", "sql") in server.calls
    args = obj(cluster, DEPLOYMENTS)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--lora-paths") + 1] == "chat=/models/adapters/chat"

    # A bad adapter is refused by the server (400): named in the status, not retried blind.
    bad = {"name": "bad", "source": "/models/adapters/broken"}
    await patch(cluster, f"{MD_PATH}/demo", {"spec": {"adapters": [chat, bad]}})
    status = await eventually(
        lambda: (s := obj(cluster, MD)["status"])["phase"] == "Degraded" and s, timeout=30
    )
    assert "loading bad from /models/adapters/broken: 400 not a LoRA adapter" in status["message"]
    assert status["adapters"] == [chat]


async def test_dropping_the_pool_deletes_the_picker(cluster, operator) -> None:
    operator.picker_image = "mirror.local/epp:v1.0.0"  # the chart's operator.endpointPickerImage
    cluster.objects[MD, NS, "demo"] = model_deployment(inferencePool={})
    picker = await eventually(lambda: obj(cluster, DEPLOYMENTS, "demo-epp"))
    assert picker["metadata"]["ownerReferences"][0]["uid"] == "uid-demo"
    assert picker["spec"]["template"]["spec"]["containers"][0]["image"] == operator.picker_image
    assert not absent(cluster, "rbac.authorization.k8s.io/v1/rolebindings", "demo-epp")

    await patch(cluster, f"{MD_PATH}/demo", {"spec": {"inferencePool": None}})

    for resource in (DEPLOYMENTS, "v1/services", "rbac.authorization.k8s.io/v1/roles"):
        await eventually(lambda r=resource: absent(cluster, r, "demo-epp"))
    await eventually(lambda: absent(cluster, "inference.networking.k8s.io/v1/inferencepools"))
    assert not absent(cluster, DEPLOYMENTS)
