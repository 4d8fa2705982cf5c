"""The chart: renders, lints, checks its values, and its manifests pass Kubernetes' schemas."""

from __future__ import annotations

import pathlib
import re
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from chart_harness import CHART, Render
from radixserve_operator import manifests
from radixserve_operator import spec as specs
from radixserve_operator.kube import PLURALS

K8S_VERSION = "1.33.0"
NON_DEFAULT = {
    "image": {"tag": "0.2.0", "pullPolicy": "Always"},
    "imagePullSecrets": ["regcred"],
    "crds": {"enabled": True, "keep": False},
    "watchNamespaces": ["ml", "ml-staging"],
    "operator": {"resyncSeconds": 10, "probeModels": False, "logLevel": "debug"},
    "serviceAccount": {"create": True, "name": "ops", "annotations": {"a": "b"}},
    "podAnnotations": {"x": "y"},
    "podLabels": {"team": "ml"},
    "nodeSelector": {"pool": "system"},
    "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
    "priorityClassName": "system-cluster-critical",
    "serviceMonitor": {"enabled": True, "interval": "30s", "labels": {"release": "prom"}},
    "networkPolicy": {"enabled": True},
    "serverNetworkPolicy": {
        "enabled": True,
        "clients": {"namespaceSelector": {"matchLabels": {"team": "ml"}}},
        "metricsScraper": {"namespaceSelector": {"matchLabels": {"name": "prometheus"}}},
        "extraFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
    },
}


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def validate_all(objects: list[dict[str, Any]]) -> int:
    """Schema-check everything Kubernetes itself defines; return how many were checked."""
    checked = 0
    for manifest in objects:
        if manifest["kind"] == "ServiceMonitor":
            continue  # a Prometheus Operator CRD: checked by shape in its own test
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
        checked += 1
    return checked


def test_defaults_render_valid_manifests(render: Render) -> None:
    objects = render()
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        [
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "Deployment",
        ]
    )
    assert validate_all(objects) == len(objects)


def test_non_default_values_render_valid_manifests(render: Render) -> None:
    objects = render(NON_DEFAULT)
    assert validate_all(objects) == len(objects) - 1
    policies = sorted(
        (p["metadata"]["name"], p["metadata"]["namespace"])
        for p in by_kind(objects, "NetworkPolicy")
    )
    assert policies == [
        ("radixserve", "radixserve-system"),  # the operator's
        ("radixserve-models", "ml"),  # the model servers', one per watched namespace
        ("radixserve-models", "ml-staging"),
    ]
    (monitor,) = by_kind(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml", "ml-staging"]}
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/managed-by"] == (
        "radixserve-operator"
    )


def test_operator_deployment(render: Render) -> None:
    (deployment,) = by_kind(render(NON_DEFAULT), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/radixserve/radixserve-operator:0.2.0"
    assert container["command"] == ["radixserve-operator"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["RADIXSERVE_OPERATOR_NAMESPACES"] == "ml,ml-staging"
    assert env["RADIXSERVE_OPERATOR_PROBE_MODELS"] == "false"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["serviceAccountName"] == "ops"


@pytest.mark.parametrize("values", [{}, NON_DEFAULT], ids=["defaults", "non-default"])
def test_operator_pod_is_locked_down(render: Render, values: dict[str, Any]) -> None:
    (deployment,) = by_kind(render(values), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # The image's USER (Dockerfile) and the model pods' (manifests.UID) are the same.
    assert pod["securityContext"]["runAsUser"] == manifests.UID != 0
    assert pod["securityContext"]["runAsGroup"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod and "hostPID" not in pod
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in context
    # Its one writable path, on a read-only root.
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == "/tmp"
    assert {"name": mount["name"], "emptyDir": {}} in pod["volumes"]


def test_crd_is_the_operator_packages_crd(render: Render) -> None:
    chart_copy = CHART / "files" / "modeldeployments.yaml"
    package = pathlib.Path(specs.__file__).parent / "crd" / "modeldeployments.yaml"
    assert chart_copy.read_bytes() == package.read_bytes(), (
        "charts/radixserve/files/modeldeployments.yaml drifted from the operator's CRD; "
        "copy operator/radixserve_operator/crd/modeldeployments.yaml over it"
    )
    (crd,) = by_kind(render(), "CustomResourceDefinition")
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert crd["spec"] == specs.crd()["spec"]


def test_crd_switches(render: Render) -> None:
    assert by_kind(render({"crds": {"enabled": False}}), "CustomResourceDefinition") == []
    (crd,) = by_kind(render({"crds": {"keep": False}}), "CustomResourceDefinition")
    assert "annotations" not in crd["metadata"]


def rules_of(role: dict[str, Any]) -> dict[str, set[str]]:
    """resource -> verbs, over all API groups."""
    verbs: dict[str, set[str]] = {}
    for rule in role["rules"]:
        for resource in rule["resources"]:
            verbs.setdefault(resource, set()).update(rule["verbs"])
    return verbs


def test_rbac_covers_what_the_operator_touches(render: Render) -> None:
    (role,) = [
        r for r in by_kind(render(), "ClusterRole") if "discovery" not in r["metadata"]["name"]
    ]
    verbs = rules_of(role)
    for kind, plural in PLURALS.items():
        if kind in ("ModelDeployment", "Secret", "Pod"):
            continue
        assert {"get", "create", "patch", "delete"} <= verbs[plural], plural
    assert "list" in verbs["pods"]  # the ready pods whose adapters the operator loads
    assert {"list", "watch", "patch"} <= verbs["modeldeployments"]
    assert {"patch"} <= verbs["modeldeployments/status"]
    assert verbs["secrets"] == {"get"}  # read only: the API key for the model probe
    assert {"list", "watch"} <= verbs["deployments"] & verbs["services"]  # child events


def test_watching_namespaces_uses_roles_not_a_cluster_role(render: Render) -> None:
    objects = render({"watchNamespaces": ["ml", "ml-staging"]})
    roles = by_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml", "ml-staging"]
    assert sorted(b["metadata"]["namespace"] for b in by_kind(objects, "RoleBinding")) == [
        "ml",
        "ml-staging",
    ]
    (cluster_role,) = by_kind(objects, "ClusterRole")
    assert set(rules_of(cluster_role)) == {"customresourcedefinitions", "namespaces"}


@pytest.mark.parametrize("values", [{}, NON_DEFAULT], ids=["defaults", "non-default"])
def test_lint_is_clean(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True, kube_version="v1.33.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


BAD_VALUES = {
    "crds.enabled not a boolean": {"crds": {"enabled": "yes"}},
    "negative resync": {"operator": {"resyncSeconds": -1}},
    "unknown log level": {"operator": {"logLevel": "trace"}},
    "bad pull policy": {"image": {"pullPolicy": "Sometimes"}},
    "unknown top-level key": {"replicaCount": 2},
    "namespace not a DNS label": {"watchNamespaces": ["ML_Team"]},
    "port out of range": {"networkPolicy": {"modelPorts": [0]}},
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_schema_rejects_bad_values(chart: helm.Chart, case: str) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(BAD_VALUES[case])


def test_schema_accepts_the_non_default_values(chart: helm.Chart) -> None:
    chart.validate_schema(NON_DEFAULT)


def test_every_value_is_documented_and_in_the_schema(chart: helm.Chart) -> None:
    # Top-level keys and their children carry a comment; deeper levels are Kubernetes
    # objects (resources) passed through as they are.
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for number, line in enumerate(lines):
        match = re.match(r"^( {0,2})([A-Za-z]\w*):", line)
        if match and not lines[number - 1].strip().startswith("#"):
            undocumented.append(match.group(2))
    assert undocumented == []
    schema = chart.schema
    assert schema is not None

    def missing(values: dict[str, Any], properties: dict[str, Any], prefix: str) -> list[str]:
        out = []
        for key, value in values.items():
            if key not in properties:
                out.append(prefix + key)
            elif isinstance(value, dict) and "properties" in properties[key]:
                out += missing(value, properties[key]["properties"], f"{prefix}{key}.")
        return out

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert missing(values, schema["properties"], "") == []


def test_notes_tell_the_next_command(chart: helm.Chart) -> None:
    rendered = chart.render({}, name="radixserve", namespace="radixserve-system", is_install=True)
    notes = rendered["radixserve/templates/NOTES.txt"]
    assert "kubectl apply -f" in notes
    assert "kubectl wait --for=condition=Ready md/smollm2" in notes
    assert "all namespaces" in notes
    scoped = chart.render({"watchNamespaces": ["ml"]}, name="radixserve", namespace="ops")
    assert "namespaces ml" in scoped["radixserve/templates/NOTES.txt"]
