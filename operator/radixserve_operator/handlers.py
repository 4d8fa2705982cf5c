"""kopf handlers: thin wiring from ModelDeployment events to `Reconciler.reconcile`.

`register` puts them on a registry the caller owns, so the real entry point and the tests
run the same handlers, each with its own way of logging in to the API.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from . import GROUP, KIND, PLURAL, VERSION
from .kube import object_path
from .reconcile import Reconciler

MANAGED = {"app.kubernetes.io/managed-by": "radixserve-operator"}
# The children the operator watches, so that a rollout or a hand edit reconciles at once.
CHILD_WATCHES = (("apps/v1", "deployments"), ("v1", "services"))


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf's bookkeeping under our own prefix, so it never collides with other operators."""
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Warnings and errors (a bad spec, a failed apply) become Events on the ModelDeployment;
    # INFO would add one for every timer run. kopf 1.45+ posts log messages only when asked.
    settings.posting.level = logging.WARNING
    settings.posting.loggers = True
    settings.watching.server_timeout = 300
    # Filter on the API server, not in kopf: without a selector every Deployment and
    # Service in the cluster would stream into the operator's memory just to be dropped.
    selector = ",".join(f"{key}={value}" for key, value in MANAGED.items())
    for group_version, plural in CHILD_WATCHES:
        settings.watching.label_selectors[group_version, plural] = selector
    settings.networking.request_timeout = 60
    # A ModelDeployment being deleted keeps its finalizer until the resync timer has exited;
    # one caught mid-reconcile (a model probe, the applies) is rechecked after this long,
    # not kopf's default 60 s.
    settings.background.cancellation_polling = 2.0


def register(
    registry: kopf.OperatorRegistry, reconciler: Reconciler, resync_seconds: float = 30.0
) -> None:
    """Register the operator's handlers on `registry`."""
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await reconciler.kube.close()

    # Explicit ids: kopf names its progress annotations after them.
    @kopf.on.create(*resource, id="apply", registry=registry)
    @kopf.on.update(*resource, id="apply", field="spec", registry=registry)
    @kopf.on.resume(*resource, id="apply", registry=registry)
    async def apply(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        state = await reconciler.reconcile(body, logger)
        if state["phase"] == "Failed":
            # Recorded as an Event; kopf tries again only when the spec changes.
            raise kopf.PermanentError(state["message"])

    @kopf.timer(*resource, id="resync", interval=resync_seconds, registry=registry)
    async def resync(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        """Put back hand-made changes to children and refresh the model probe."""
        await reconciler.reconcile(body, logger)

    async def child_changed(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        """A child changed (rollout progress, a hand edit): reconcile its owner now."""
        namespace = body["metadata"]["namespace"]
        for ref in body["metadata"].get("ownerReferences", []):
            if ref.get("kind") != KIND or not ref.get("apiVersion", "").startswith(f"{GROUP}/"):
                continue
            owner = await reconciler.kube.get(
                object_path(ref["apiVersion"], KIND, namespace, ref["name"])
            )
            if owner is not None and not owner["metadata"].get("deletionTimestamp"):
                await reconciler.reconcile(owner, logger)

    for group_version, plural in CHILD_WATCHES:
        kopf.on.event(
            group_version, plural, labels=MANAGED, registry=registry, id=f"{plural}-changed"
        )(child_changed)
