"""Run the real operator (kopf) against kmock, an in-memory Kubernetes API.

kmock stores and watches objects but runs no controllers, so tests play the controllers'
part themselves: they write a Deployment's status and answer the model probe (hostnames
under .svc.cluster.local resolve to kmock). The API server's own bookkeeping
(resourceVersion, generation, server-side apply) is emulator.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import kmock as kmock_lib
import kopf
import pytest
from emulator import ApiServer
from operator_harness import MD
from radixserve_operator import handlers
from radixserve_operator.kube import KubeClient
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
    kmock.resources["inference.networking.k8s.io/v1/inferencepools"] = kmock_lib.ResourceInfo(
        kind="InferencePool", singular="inferencepool", namespaced=True, verbs=verbs
    )
    return kmock


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "operator_options(namespaces=[...], post_events=True): run the `operator` fixture "
        "watching only these namespaces (default: all) and posting kopf's Events (default: off)",
    )


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


@pytest.fixture
async def operator(
    cluster: kmock_lib.KubernetesEmulator, request: pytest.FixtureRequest
) -> AsyncIterator[Reconciler]:
    """The operator running against kmock for the test (options: `operator_options`)."""
    marker = request.node.get_closest_marker("operator_options")
    options = marker.kwargs if marker else {}
    async with running_operator(cluster, **options) as reconciler:
        yield reconciler
