"""serverNetworkPolicy: who may reach the model servers, evaluated the way a CNI applies a
NetworkPolicy to the pods the operator creates."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
from chart_harness import Render
from radixserve_operator import manifests
from radixserve_operator.spec import with_defaults

K8S_VERSION = "1.33.0"
ENABLED = {"serverNetworkPolicy": {"enabled": True}, "watchNamespaces": ["ml", "ml-staging"]}
CLIENT = {"radixserve.dev/client": "true"}


def server_policies(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        o
        for o in objects
        if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].endswith("-models")
    ]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector's meaning (an empty one selects everything)."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        present, value = expression["key"] in labels, labels.get(expression["key"])
        match expression["operator"]:
            case "In" if value not in expression["values"]:
                return False
            case "NotIn" if value in expression["values"]:
                return False
            case "Exists" if not present:
                return False
            case "DoesNotExist" if present:
                return False
    return True


def admits(
    policy: dict[str, Any],
    namespace: str,
    pod: dict[str, str],
    port: int,
    namespace_labels: dict[str, str] | None = None,
) -> bool:
    """Whether a pod with these labels in this namespace may connect to `port` of the
    selected pods (NetworkPolicy semantics: peers OR, both selectors of one peer AND, no
    namespaceSelector = the policy's own namespace)."""
    namespace_labels = (namespace_labels or {}) | {"kubernetes.io/metadata.name": namespace}
    for rule in policy["spec"]["ingress"]:
        if not any(p["port"] == port and p["protocol"] == "TCP" for p in rule["ports"]):
            continue
        for peer in rule["from"]:
            if "ipBlock" in peer:
                continue
            if "namespaceSelector" in peer:
                in_namespace = selects(peer["namespaceSelector"], namespace_labels)
            else:
                in_namespace = namespace == policy["metadata"]["namespace"]
            if in_namespace and selects(peer.get("podSelector", {}), pod):
                return True
    return False


def model_pod_labels() -> dict[str, str]:
    deployment = manifests.deployment("demo", "ml", with_defaults({}))
    return deployment["spec"]["template"]["metadata"]["labels"]


def operator_pod_labels(objects: list[dict[str, Any]]) -> dict[str, str]:
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    return deployment["spec"]["template"]["metadata"]["labels"]


def test_disabled_renders_no_server_policy(render: Render) -> None:
    assert server_policies(render()) == []
    assert server_policies(render({"watchNamespaces": ["ml"]})) == []
    # The operator's own policy is a separate switch.
    objects = render({"watchNamespaces": ["ml"], "networkPolicy": {"enabled": True}})
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "NetworkPolicy"] == [
        "radixserve"
    ]


def test_one_valid_policy_per_watched_namespace_on_the_model_pods(render: Render) -> None:
    objects = render(ENABLED)
    policies = server_policies(objects)
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["ml", "ml-staging"]
    for policy in policies:
        kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        selector = policy["spec"]["podSelector"]
        assert selects(selector, model_pod_labels())
        assert not selects(selector, operator_pod_labels(objects))
        (rule,) = policy["spec"]["ingress"]
        assert rule["ports"] == [{"port": manifests.SERVER_PORT, "protocol": "TCP"}]
    server = manifests.deployment("demo", "ml", with_defaults({}))["spec"]["template"]["spec"]
    assert server["containers"][0]["ports"][0]["containerPort"] == manifests.SERVER_PORT


def test_only_labelled_clients_the_scraper_and_the_operator_get_in(render: Render) -> None:
    objects = render(ENABLED)
    policy = next(p for p in server_policies(objects) if p["metadata"]["namespace"] == "ml")
    port = manifests.SERVER_PORT
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    assert admits(policy, "ml", CLIENT | {"app": "web"}, port)
    assert not admits(policy, "ml", {"app": "web"}, port)  # unlabelled
    assert not admits(policy, "other", CLIENT, port)  # labelled, but another namespace
    assert not admits(policy, "ml", CLIENT, 8080)  # another port
    assert admits(policy, "monitoring", prometheus, port)
    assert not admits(policy, "monitoring", {"app": "grafana"}, port)
    assert not admits(policy, "ml", prometheus, port)  # the label alone is not the scraper
    assert admits(policy, "radixserve-system", operator_pod_labels(objects), port)
    assert not admits(policy, "radixserve-system", {"app": "other"}, port)
    # The endpoint picker in the model's namespace scores the pods from their /metrics.
    picker = manifests.picker_objects("demo", "ml", with_defaults({"inferencePool": {}}))
    (picker_pods,) = [
        m["spec"]["template"]["metadata"]["labels"] for m in picker if m["kind"] == "Deployment"
    ]
    assert admits(policy, "ml", picker_pods, port)
    assert not admits(policy, "other", picker_pods, port)


def test_selectors_follow_the_values(render: Render) -> None:
    values = {
        "watchNamespaces": ["ml"],
        "operator": {"probeModels": False},
        "serverNetworkPolicy": {
            "enabled": True,
            "namespaces": ["serving"],
            "clients": {
                # Helm merges maps into the defaults: null drops the default label.
                "podSelector": {"matchLabels": {"radixserve.dev/client": None, "team": "chat"}},
                "namespaceSelector": {
                    "matchExpressions": [{"key": "tier", "operator": "In", "values": ["apps"]}]
                },
            },
            "metricsScraper": {"enabled": False},
            "extraFrom": [{"namespaceSelector": {"matchLabels": {"gateway": "true"}}}],
        },
    }
    objects = render(values)
    (policy,) = server_policies(objects)
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    assert policy["metadata"]["namespace"] == "serving"  # namespaces wins over watchNamespaces
    port = manifests.SERVER_PORT
    assert admits(policy, "frontend", {"team": "chat"}, port, {"tier": "apps"})
    assert not admits(policy, "frontend", {"team": "chat"}, port, {"tier": "batch"})
    assert not admits(policy, "serving", {"team": "chat"}, port)  # its own namespace: no tier
    assert not admits(policy, "serving", CLIENT, port)  # the default label no longer counts
    assert not admits(policy, "monitoring", {"app.kubernetes.io/name": "prometheus"}, port)
    assert not admits(policy, "radixserve-system", operator_pod_labels(objects), port)
    assert admits(policy, "edge", {"app": "envoy"}, port, {"gateway": "true"})  # extraFrom
    assert len(policy["spec"]["ingress"][0]["from"]) == 3  # clients, the picker, extraFrom


def test_a_label_added_to_the_default_is_required_too(render: Render) -> None:
    values = {
        "watchNamespaces": ["ml"],
        "serverNetworkPolicy": {
            "enabled": True,
            "clients": {"podSelector": {"matchLabels": {"team": "chat"}}},
        },
    }
    (policy,) = server_policies(render(values))
    assert admits(policy, "ml", CLIENT | {"team": "chat"}, manifests.SERVER_PORT)
    assert not admits(policy, "ml", {"team": "chat"}, manifests.SERVER_PORT)
    assert not admits(policy, "ml", CLIENT, manifests.SERVER_PORT)


def test_any_namespace_when_asked(render: Render) -> None:
    values = {
        "watchNamespaces": ["ml"],
        "serverNetworkPolicy": {"enabled": True, "clients": {"namespaceSelector": {}}},
    }
    (policy,) = server_policies(render(values))
    assert admits(policy, "anywhere", CLIENT, manifests.SERVER_PORT)
    assert not admits(policy, "anywhere", {"app": "web"}, manifests.SERVER_PORT)


def test_all_namespaces_needs_the_namespaces_listed(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"serverNetworkPolicy\.namespaces"):
        chart.render(
            {"serverNetworkPolicy": {"enabled": True}},
            name="radixserve",
            namespace="radixserve-system",
            is_install=True,
        )


BAD_VALUES = {
    "unknown selector key": {"clients": {"podSelector": {"labels": {"a": "b"}}}},
    "bad operator": {
        "clients": {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Is"}]}}
    },
    "label value not a string": {"metricsScraper": {"podSelector": {"matchLabels": {"a": 1}}}},
    "namespace not a DNS label": {"namespaces": ["Serving"]},
    "empty peer": {"extraFrom": [{}]},
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_schema_rejects_bad_values(chart: helm.Chart, case: str) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema({"serverNetworkPolicy": BAD_VALUES[case]})


def test_notes_name_the_client_labels(chart: helm.Chart) -> None:
    rendered = chart.render(ENABLED, name="radixserve", namespace="radixserve-system")
    notes = rendered["radixserve/templates/NOTES.txt"]
    assert "namespaces ml, ml-staging admit only client pods" in notes
    assert "kubectl run client --labels=radixserve.dev/client=true" in notes
    plain = chart.render({}, name="radixserve", namespace="radixserve-system")
    assert "--labels" not in plain["radixserve/templates/NOTES.txt"]
