"""Least privilege, checked against what the operator really does: run it (kopf) against
kmock, collect every Kubernetes API call it makes, and authorize each one against the RBAC
objects the Helm chart renders, the way the API server would."""

from __future__ import annotations

import base64
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import helm_python as helm
import kmock as kmock_lib
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
from radixserve_operator.kube import USER_AGENT

CHART = pathlib.Path(__file__).resolve().parents[2] / "charts" / "radixserve"
RELEASE, RELEASE_NS = "radixserve", "radixserve-system"

Call = tuple[str | None, str, str, str]
"""namespace (None: cluster scope), API group, resource[/subresource], RBAC verb."""

# One scenario with three ModelDeployments and every kind of child: each resync makes
# dozens of calls to an in-process API server on a shared CPU, so allow it time.
SLOW = 30.0

# Granted, yet no code path here calls them: each needs its reason.
NOT_CALLED = {
    ("policy", "poddisruptionbudgets", "delete"): "OwnerReferencesPermissionEnforcement",
    ("radixserve.dev", "modeldeployments/finalizers", "update"): "blockOwnerDeletion",
    # Kubernetes lets a client grant in a Role only what it holds itself: the endpoint
    # picker's Role reads pods, pools and objectives.
    ("", "pods", "get"): "granted to the endpoint picker",
    ("", "pods", "watch"): "granted to the endpoint picker",
    ("inference.networking.k8s.io", "inferencepools", "list"): "granted to the endpoint picker",
    ("inference.networking.k8s.io", "inferencepools", "watch"): "granted to the endpoint picker",
    ("inference.networking.x-k8s.io", "inferenceobjectives", "get"): "granted to the picker",
    ("inference.networking.x-k8s.io", "inferenceobjectives", "list"): "granted to the picker",
    ("inference.networking.x-k8s.io", "inferenceobjectives", "watch"): "granted to the picker",
}


def as_call(method: str, path: str, params: dict[str, str]) -> Call | None:
    """The RBAC request a REST call makes; None for discovery and non-API paths."""
    parts = path.strip("/").split("/")
    if parts[0] == "api" and len(parts) >= 3:
        group, rest = "", parts[2:]
    elif parts[0] == "apis" and len(parts) >= 4:
        group, rest = parts[1], parts[3:]
    else:
        return None  # /api, /apis, /apis/<group>/<version>, a model's /health ...
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    resource = "/".join(rest[0:3:2])  # plural, or plural/subresource
    named = len(rest) > 1
    if method == "GET":
        verb = "watch" if params.get("watch") in ("true", "1") else "get" if named else "list"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, "")
        if method == "DELETE":
            verb = "delete" if named else "deletecollection"
    return namespace, group, resource, verb


def test_as_call_reads_paths_like_the_api_server() -> None:
    assert as_call("GET", "/apis/apps/v1/namespaces/ml/deployments/x", {}) == (
        "ml",
        "apps",
        "deployments",
        "get",
    )
    assert as_call("GET", "/apis/radixserve.dev/v1alpha1/modeldeployments", {"watch": "true"}) == (
        None,
        "radixserve.dev",
        "modeldeployments",
        "watch",
    )
    assert as_call("PATCH", "/apis/g/v1/namespaces/ml/things/x/status", {}) == (
        "ml",
        "g",
        "things/status",
        "patch",
    )
    assert as_call("GET", "/api/v1/namespaces", {}) == (None, "", "namespaces", "list")
    assert as_call("POST", "/api/v1/namespaces/ml/events", {}) == ("ml", "", "events", "create")
    assert as_call("GET", "/apis/apps/v1", {}) is None
    assert as_call("GET", "/v1/models", {}) is None


def api_calls(cluster: kmock_lib.KubernetesEmulator) -> set[Call]:
    """Every Kubernetes API call the operator (kopf or its own client) has made so far;
    the test's own writes, which play the user's and the cluster's part, are left out."""
    calls = set()
    for request in cluster:
        agent = request.headers.get("User-Agent", "")
        if not (agent.startswith("kopf/") or agent == USER_AGENT):
            continue
        call = as_call(str(request.method.value).upper(), request.url.path, dict(request.params))
        if call is not None:
            calls.add(call)
    # A server-side apply that creates the object is authorized as `create` too.
    calls |= {(ns, group, plural, "create") for ns, group, plural in cluster.apply_creates}
    return calls


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    rendered = chart.render(values, name=RELEASE, namespace=RELEASE_NS, is_install=True)
    return [
        doc
        for path, text in rendered.items()
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def authorizer(objects: list[dict[str, Any]]) -> Callable[[Call], bool]:
    """RBAC as the API server evaluates it for the chart's ServiceAccount."""
    roles = {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o["rules"]
        for o in objects
        if o["kind"] in ("ClusterRole", "Role")
    }
    account = {"kind": "ServiceAccount", "name": RELEASE, "namespace": RELEASE_NS}
    everywhere: list[dict[str, Any]] = []
    per_namespace: dict[str, list[dict[str, Any]]] = {}
    for binding in objects:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        if account not in binding["subjects"]:
            continue
        ref, namespace = binding["roleRef"], binding["metadata"].get("namespace")
        rules = roles[
            (ref["kind"], None if ref["kind"] == "ClusterRole" else namespace, ref["name"])
        ]
        if binding["kind"] == "ClusterRoleBinding":
            everywhere += rules
        else:  # a RoleBinding grants only inside its own namespace
            per_namespace.setdefault(namespace, []).extend(rules)

    def allowed(call: Call) -> bool:
        namespace, group, resource, verb = call
        rules = everywhere + (per_namespace.get(namespace, []) if namespace else [])
        return any(
            group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
            for rule in rules
        )

    return allowed


def namespaced_grants(objects: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(group, resource, verb) of the role the operator gets in each watched namespace."""
    (role,) = [
        o
        for o in objects
        if o["kind"] == "ClusterRole" and not o["metadata"]["name"].endswith("-discovery")
    ]
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


HAND_EDITS = [
    # (resource, name, merge patch, the field the operator must put back)
    (DEPLOYMENTS, "demo", {"spec": {"replicas": 7}}, lambda o: o["spec"]["replicas"] == 1),
    (
        "v1/services",
        "demo",
        {"spec": {"type": "NodePort"}},
        lambda o: o["spec"]["type"] == "ClusterIP",
    ),
    (
        "policy/v1/poddisruptionbudgets",
        "demo",
        {"spec": {"maxUnavailable": 3}},
        lambda o: o["spec"]["maxUnavailable"] == 1,
    ),
    (
        "autoscaling/v2/horizontalpodautoscalers",
        "demo",
        {"spec": {"maxReplicas": 9}},
        lambda o: o["spec"]["maxReplicas"] == 4,
    ),
    (
        "inference.networking.k8s.io/v1/inferencepools",
        "demo",
        {"spec": {"targetPorts": [{"number": 1}]}},
        lambda o: o["spec"]["targetPorts"] == [{"number": 30000}],
    ),
    (
        "v1/persistentvolumeclaims",
        "demo-model-cache",
        {"spec": {"resources": {"requests": {"storage": "1Gi"}}}},
        lambda o: o["spec"]["resources"]["requests"]["storage"] == "10Gi",
    ),
]
# Children only some specs ask for: created (get, patch, create) and deleted when the spec
# drops them; a hand edit to them takes the same path as to those above.
PICKER_AND_ROUTE = [
    ("gateway.networking.k8s.io/v1/httproutes", "demo"),
    ("v1/serviceaccounts", "demo-epp"),
    ("rbac.authorization.k8s.io/v1/roles", "demo-epp"),
    ("rbac.authorization.k8s.io/v1/rolebindings", "demo-epp"),
    (DEPLOYMENTS, "demo-epp"),
    ("v1/services", "demo-epp"),
]
MULTI_NODE = [
    ("leaderworkerset.x-k8s.io/v1/leaderworkersets", "multi"),
    ("keda.sh/v1alpha1/scaledobjects", "multi"),
]


def path_of(resource: str, name: str) -> str:
    group_version, plural = resource.rsplit("/", 1)
    prefix = "/api" if group_version == "v1" else "/apis"
    return f"{prefix}/{group_version}/namespaces/{NS}/{plural}/{name}"


@pytest.mark.operator_options(post_events=True)
async def test_every_call_is_granted_and_every_grant_is_called(
    chart: helm.Chart, cluster: kmock_lib.KubernetesEmulator, operator: Any
) -> None:
    """All namespaces (the chart's default): one scenario through every code path."""
    cluster["get /health"] << {"status": "ok"}
    cluster["get /v1/models"] << {"object": "list", "data": [{"id": "demo", "object": "model"}]}
    key = base64.b64encode(b"k").decode()
    cluster.objects["v1/secrets", NS, "demo-key"] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "demo-key", "namespace": NS},
        "data": {"api-key": key},
    }
    cluster.objects[MD, NS, "demo"] = model_deployment(
        model={"huggingFace": {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct"}},
        apiKeySecretRef={"name": "demo-key"},
        autoscaling={"minReplicas": 1, "maxReplicas": 4},
        modelCache={"size": "10Gi", "accessMode": "ReadWriteMany"},
        inferencePool={"gateway": {"name": "gw"}},
        adapters=[{"name": "sql", "source": "hf://org/sql-lora"}],
    )
    # An impossible spec: the operator refuses it and kopf posts a warning Event.
    cluster.objects[MD, NS, "broken"] = model_deployment(
        "broken", resources={"gpus": 1}, tensorParallelSize=2
    )
    for resource, name in [(r, n) for r, n, _, _ in HAND_EDITS] + PICKER_AND_ROUTE:
        await eventually(lambda r=resource, n=name: obj(cluster, r, n), timeout=SLOW)
    await patch(cluster, f"{DEPLOY_PATH}/demo/status", READY_DEPLOYMENT_STATUS)
    await eventually(lambda: obj(cluster, MD)["status"]["phase"] == "Ready", timeout=SLOW)

    for resource, name, edit, restored in HAND_EDITS:
        await eventually(lambda r=resource, n=name: obj(cluster, r, n), timeout=SLOW)
        await patch(cluster, path_of(resource, name), edit)
        await eventually(
            lambda r=resource, n=name, ok=restored: ok(obj(cluster, r, n)), timeout=SLOW
        )

    dropped = {"autoscaling": None, "modelCache": None, "inferencePool": None}
    await patch(cluster, f"{MD_PATH}/demo", {"spec": dropped})
    for resource, name in [(r, n) for r, n, _, _ in HAND_EDITS[3:]] + PICKER_AND_ROUTE:
        await eventually(lambda r=resource, n=name: absent(cluster, r, n), timeout=SLOW)
    async with cluster.delete(f"{MD_PATH}/demo") as response:
        assert response.status == 200
    await eventually(lambda: absent(cluster, MD), timeout=SLOW)

    # Then a multi-node model scaled by KEDA, back to one node at the end.
    multi = model_deployment(
        "multi",
        resources={"gpus": 1},
        tensorParallelSize=2,
        parallelism={"nodes": 2},
        autoscaling={
            "minReplicas": 0,
            "maxReplicas": 2,
            "keda": {"prometheusAddress": "http://prometheus:9090"},
        },
    )
    # Through the API, so that the operator's watch sees it arrive.
    async with cluster.post(MD_PATH, json=multi) as response:
        assert response.status in (200, 201), await response.text()
    for resource, name in MULTI_NODE:
        await eventually(lambda r=resource, n=name: obj(cluster, r, n), timeout=SLOW)
    back = {"parallelism": None, "resources": None, "tensorParallelSize": None, "autoscaling": None}
    await patch(cluster, f"{MD_PATH}/multi", {"spec": back})
    for resource, name in MULTI_NODE:
        await eventually(lambda r=resource, n=name: absent(cluster, r, n), timeout=SLOW)
    await eventually(lambda: (NS, "", "events", "create") in api_calls(cluster), timeout=SLOW)

    calls = api_calls(cluster)
    objects = render(chart, {})
    allowed = authorizer(objects)
    assert sorted(call for call in calls if not allowed(call)) == []
    called = {(group, resource, verb) for _, group, resource, verb in calls}
    unused = namespaced_grants(objects) - called
    assert unused == set(NOT_CALLED), "a grant nothing calls: remove it or give its reason"


@pytest.mark.operator_options(namespaces=[NS])
async def test_watching_one_namespace_needs_only_its_role(
    chart: helm.Chart, cluster: kmock_lib.KubernetesEmulator, operator: Any
) -> None:
    """watchNamespaces: a Role per namespace, so no call of the operator may leave it."""
    cluster.objects[MD, NS, "demo"] = model_deployment()
    await eventually(lambda: obj(cluster, DEPLOYMENTS))
    await eventually(lambda: obj(cluster, MD)["status"]["phase"] == "Progressing")

    calls = api_calls(cluster)
    allowed = authorizer(render(chart, {"watchNamespaces": [NS]}))
    assert sorted(call for call in calls if not allowed(call)) == []
    # Watched in the namespace, not cluster-wide (which a Role could not allow).
    assert (NS, "radixserve.dev", "modeldeployments", "watch") in calls
    assert (NS, "apps", "deployments", "watch") in calls
    # kopf's namespace and CRD scanning is off here (see conftest), so nothing else is left.
    assert {namespace for namespace, *_ in calls} == {NS}
    # A Role in another namespace would not do.
    assert not authorizer(render(chart, {"watchNamespaces": ["other"]}))(
        (NS, "apps", "deployments", "create")
    )
