"""Run the real operator (kopf) against kmock, an in-memory Kubernetes API.

kmock stores and watches objects but runs no controllers, so tests play the controllers'
part themselves: they write a Deployment's status and answer the model probe (hostnames
under .svc.cluster.local resolve to kmock). The API server's own bookkeeping
(resourceVersion, generation, server-side apply) is emulator.py's.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import kmock as kmock_lib
import pytest
from emulator import ApiServer
from operator_harness import MD, running_operator
from radixserve_operator.reconcile import Reconciler


@pytest.fixture
def kmock_options(kmock_options: dict[str, Any]) -> dict[str, Any]:
    """kmock with the API server's behaviours the operator needs (emulator.py); calls to
    model Services (…svc.cluster.local) are routed to it too."""
    hostnames = re.compile(r".*\.svc\.cluster\.local")
    return {**kmock_options, "cls": ApiServer, "hostnames": hostnames}


@pytest.fixture
def cluster(kmock: kmock_lib.KubernetesEmulator) -> kmock_lib.KubernetesEmulator:
    """Builtin resources plus the CRDs the operator touches, declared for discovery."""
    kmock.resources.load_bundled()
    verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
    kmock.resources[MD] = kmock_lib.ResourceInfo(
        kind="ModelDeployment",
        singular="modeldeployment",
        namespaced=True,
        verbs=verbs,
        shortnames=["md"],
        subresources=["status", "scale"],
    )
    optional = {
        "inference.networking.k8s.io/v1/inferencepools": "InferencePool",
        "gateway.networking.k8s.io/v1/httproutes": "HTTPRoute",
        "leaderworkerset.x-k8s.io/v1/leaderworkersets": "LeaderWorkerSet",
        "keda.sh/v1alpha1/scaledobjects": "ScaledObject",
    }
    for resource, kind in optional.items():
        kmock.resources[resource] = kmock_lib.ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=True, verbs=verbs
        )
    return kmock


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "operator_options(namespaces=[...], post_events=True): run the `operator` fixture "
        "watching only these namespaces (default: all) and posting kopf's Events (default: off)",
    )


@pytest.fixture
async def operator(
    cluster: kmock_lib.KubernetesEmulator, request: pytest.FixtureRequest
) -> AsyncIterator[Reconciler]:
    """The operator running against kmock for the test (options: `operator_options`)."""
    marker = request.node.get_closest_marker("operator_options")
    options = marker.kwargs if marker else {}
    async with running_operator(cluster, **options) as reconciler:
        yield reconciler
