"""The chart's RBAC is the table in docs/kubernetes.md, row for row, verb for verb.

(That every call the operator makes is granted, and every grant is called or has its
reason, is tests/operator/test_operator_rbac.py.)"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from chart_harness import CHART, Render

DOCS = CHART.parents[1] / "docs" / "kubernetes.md"
SECTION = "## What the operator may do (RBAC)"
Grant = tuple[str, str, str, str]
"""scope, API group ("" for core), resource, verb."""

# A row's scope -> (the rendered scope it means, rendered only with watchNamespaces).
SCOPES = {
    "cluster": ("cluster", False),
    "cluster, with `watchNamespaces`": ("cluster", True),
    "watched namespaces": ("watched namespaces", False),
}


def documented(with_namespaces: bool) -> list[Grant]:
    """The grants the docs' table lists for a chart with or without watchNamespaces."""
    section = DOCS.read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header, separator, *body = rows
    assert header.replace(" ", "") == "|scope|APIgroup|resource|verbs|why|"
    assert set(separator) <= {"|", "-", " "}
    grants = []
    for row in body:
        scope, group, resource, verbs, why = (cell.strip() for cell in row.strip("|").split("|"))
        assert why, f"{resource}: say why"
        rendered_scope, only_with_namespaces = SCOPES[scope]
        if only_with_namespaces and not with_namespaces:
            continue
        group = "" if group == "core" else group.strip("`")
        for verb in verbs.split(","):
            grants.append((rendered_scope, group, resource.strip("`"), verb.strip()))
    return grants


def rendered(objects: list[dict[str, Any]]) -> set[Grant]:
    grants = set()
    for role in objects:
        if role["kind"] not in ("ClusterRole", "Role"):
            continue
        discovery = role["metadata"]["name"].endswith("-discovery")
        assert (role["kind"] == "ClusterRole") or not discovery
        scope = "cluster" if discovery else "watched namespaces"
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        grants.add((scope, group, resource, verb))
    return grants


@pytest.mark.parametrize("namespaces", [[], ["ml", "ml-staging"]], ids=["all", "named"])
def test_rbac_is_the_documented_table(render: Render, namespaces: list[str]) -> None:
    objects = render({"watchNamespaces": namespaces})
    table = documented(with_namespaces=bool(namespaces))
    assert [g for g, n in Counter(table).items() if n > 1] == []  # each grant once
    assert rendered(objects) == set(table)


def test_no_wildcards_and_every_role_is_bound_to_the_operator(render: Render) -> None:
    for namespaces in ([], ["ml"]):
        objects = render({"watchNamespaces": namespaces})
        roles = {
            (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
            for o in objects
            if o["kind"] in ("ClusterRole", "Role")
        }
        bound = set()
        for binding in objects:
            if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
                continue
            assert binding["subjects"] == [
                {"kind": "ServiceAccount", "name": "radixserve", "namespace": "radixserve-system"}
            ]
            ref = binding["roleRef"]
            namespace = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
            bound.add((ref["kind"], namespace, ref["name"]))
        assert bound == roles
        for _, group, resource, verb in rendered(objects):
            assert "*" not in (group, resource, verb)
