"""Helpers shared by the operator tests: names, object builders, polling."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import kmock as kmock_lib
import kopf
from radixserve_operator import handlers
from radixserve_operator.kube import KubeClient
from radixserve_operator.reconcile import Reconciler

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


@contextlib.asynccontextmanager
async def running_operator(
    cluster: kmock_lib.KubernetesEmulator,
    namespaces: list[str] | None = None,
    post_events: bool = False,
    server_side_selectors: bool = True,
) -> AsyncIterator[Reconciler]:
    """The operator's own handlers on a fresh registry, logged in to kmock, until exit.

    `server_side_selectors=False` drops the label selectors from kopf's watches, as the
    operator ran before it filtered on the API server (to measure what that cost).
    """
    namespaces = namespaces or []
    registry = kopf.OperatorRegistry()
    reconciler = Reconciler(kube=KubeClient(str(cluster.url)), probe_timeout=2.0)
    handlers.register(registry, reconciler, resync_seconds=0.5)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=str(cluster.url))

    @kopf.on.startup(registry=registry)
    def quiet(settings: kopf.OperatorSettings, **_: Any) -> None:
        # kopf's Events (one per warning) only add noise to most tests; those that check
        # the calls kopf makes turn posting on.
        settings.posting.enabled = post_events
        settings.watching.reconnect_backoff = 0.1
        # Watching named namespaces, kopf lists /api/v1/namespaces to follow them; kmock 0.8
        # answers that path with a 500 (its path parser expects a name after "namespaces").
        # Without scanning, kopf takes the names as given (and skips watching CRDs too).
        settings.scanning.disabled = bool(namespaces)
        if not server_side_selectors:
            settings.watching.label_selectors.clear()

    # On stop, kopf gives every task that appeared while it ran (besides its root tasks)
    # 5s to finish, then cancels it. Here those are kmock's server tasks, this teardown
    # and kopf's timers (which the root tasks' own shutdown stops); once stopping, the
    # collection below tells kopf to leave them all to the event loop's own cleanup.
    stopping = False

    class Untouchable(set):
        def __contains__(self, task: object) -> bool:
            return stopping or super().__contains__(task)

    stop = asyncio.Event()
    tasks = await kopf.spawn_tasks(
        registry=registry,
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=True,
        stop_flag=stop,
    )
    runner = asyncio.create_task(kopf.run_tasks(tasks, ignored=Untouchable(asyncio.all_tasks())))
    try:
        yield reconciler
    finally:
        stopping = True
        stop.set()
        done, _ = await asyncio.wait({runner}, timeout=15)
        await reconciler.kube.close()  # a handler may have reopened it after kopf's cleanup
    assert runner in done, "the operator did not stop within 15s"
