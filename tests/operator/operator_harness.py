"""Helpers shared by the operator tests: names, object builders, polling."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import kmock as kmock_lib

NS = "default"
MD = "radixserve.dev/v1alpha1/modeldeployments"
MD_PATH = f"/apis/radixserve.dev/v1alpha1/namespaces/{NS}/modeldeployments"
DEPLOYMENTS = "apps/v1/deployments"
DEPLOY_PATH = f"/apis/apps/v1/namespaces/{NS}/deployments"


def model_deployment(name: str = "demo", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "radixserve.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": f"uid-{name}",
            "generation": 1,
            "resourceVersion": "1",
        },
        "spec": spec,
    }


async def eventually(
    check: Callable[[], Any] | Callable[[], Awaitable[Any]], timeout: float = 10.0
) -> Any:
    """Poll until `check` returns something truthy without raising; return it."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
            error: BaseException | None = None
        except (KeyError, AssertionError, TypeError) as exc:
            error = exc
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached within {timeout}s (last error: {error!r})")
        await asyncio.sleep(0.05)


def obj(kmock: kmock_lib.KubernetesEmulator, resource: str, name: str = "demo") -> dict[str, Any]:
    """The latest stored version of an object as a plain dict (KeyError while absent)."""
    found = kmock.objects[resource, NS, name]  # KeyError while never created
    if found.deleted:
        raise KeyError((resource, NS, name))
    return found.raw


def absent(kmock: kmock_lib.KubernetesEmulator, resource: str, name: str = "demo") -> bool:
    try:
        obj(kmock, resource, name)
    except KeyError:
        return True
    return False


async def patch(cluster: kmock_lib.KubernetesEmulator, path: str, body: dict[str, Any]) -> None:
    """Write through the API (not kmock.objects) so that watchers see the change."""
    headers = {"Content-Type": "application/merge-patch+json"}
    async with cluster.patch(path, json=body, headers=headers) as response:
        assert response.status == 200, await response.text()


# What the Deployment controller writes once generation 1 has rolled out to one replica.
READY_DEPLOYMENT_STATUS = {
    "status": {
        "observedGeneration": 1,
        "replicas": 1,
        "readyReplicas": 1,
        "updatedReplicas": 1,
        "availableReplicas": 1,
        "conditions": [
            {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
            {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
        ],
    }
}
