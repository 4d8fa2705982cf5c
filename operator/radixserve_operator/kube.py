"""A small async Kubernetes API client for the operator's own reads and writes.

kopf watches and patches the ModelDeployments itself; the children need get, server-side
apply and delete, and the status a merge patch, which this does over aiohttp. Where the credentials come
from is the caller's choice (`from_kubeconfig` in the cluster or on a laptop, a bare URL
in tests), so nothing here is tied to one way of logging in.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

# Names the operator's own calls in the API server's audit log (kopf's say "kopf/<version>").
USER_AGENT = "radixserve-operator"
# Server-side apply's owner of every field the operator sets (`kubectl get -o yaml
# --show-managed-fields` shows it).
FIELD_MANAGER = "radixserve-operator"
APPLY_PATCH = "application/apply-patch+yaml"
PLURALS = {
    "Deployment": "deployments",
    "Service": "services",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    "InferencePool": "inferencepools",
    "HTTPRoute": "httproutes",
    "LeaderWorkerSet": "leaderworkersets",
    "ScaledObject": "scaledobjects",
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Secret": "secrets",
    "Pod": "pods",
    "ModelDeployment": "modeldeployments",
}


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def object_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    """The REST path of a namespaced object (or its collection when name is None)."""
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{prefix}/namespaces/{namespace}/{PLURALS[kind]}"
    return f"{path}/{name}" if name else path


@dataclass
class KubeClient:
    server: str
    ssl_context: ssl.SSLContext | bool = True
    # Called per request: service-account tokens rotate, so the header is never cached.
    authorization: Callable[[], str | None] = lambda: None
    timeout: float = 30.0
    _session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_kubeconfig(cls) -> KubeClient:
        """In-cluster service account first, then ~/.kube/config (as kubectl does)."""
        from kubernetes import client, config

        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            # Read KUBECONFIG now: the library's default is fixed when it is imported.
            path = os.environ.get("KUBECONFIG") or None
            config.load_kube_config(config_file=path, client_configuration=cfg)
        if not cfg.verify_ssl:
            context: ssl.SSLContext | bool = False
        else:
            context = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
            if cfg.cert_file:
                context.load_cert_chain(cfg.cert_file, cfg.key_file)

        def authorization() -> str | None:
            return cfg.auth_settings().get("BearerToken", {}).get("value")

        return cls(server=cfg.host, ssl_context=context, authorization=authorization)

    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if body is not None:
            headers["Content-Type"] = content_type
        token = self.authorization()
        if token:
            headers["Authorization"] = token
        async with self._session.request(
            method,
            self.server.rstrip("/") + path,
            data=None if body is None else json.dumps(body),
            params=params,
            headers=headers,
            ssl=self.ssl_context,
        ) as response:
            payload = await response.json(content_type=None)
            if response.status >= 400:
                message = payload.get("message", "") if isinstance(payload, dict) else ""
                raise ApiError(response.status, message or str(payload))
            return payload

    async def get(self, path: str) -> dict[str, Any] | None:
        try:
            return await self._request("GET", path)
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    async def list(self, path: str, label_selector: str) -> list[dict[str, Any]]:
        """The items of a collection that the label selector picks (on the API server)."""
        found = await self._request("GET", path, params={"labelSelector": label_selector})
        return found.get("items", [])

    async def serves(self, api_version: str, kind: str) -> bool:
        """Whether the API server serves this kind (its CRD is installed), from discovery."""
        if "/" not in api_version:
            return True  # the core group is always there
        found = await self.get(f"/apis/{api_version}")
        resources = (found or {}).get("resources", [])
        return any(resource.get("name") == PLURALS[kind] for resource in resources)

    async def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """JSON merge patch; used only for the ModelDeployment's status, which is all ours."""
        return await self._request("PATCH", path, body, "application/merge-patch+json")

    async def apply(
        self, path: str, manifest: dict[str, Any], dry_run: bool = False
    ) -> dict[str, Any]:
        """Server-side apply: the API server merges (lists by key), creates a missing object,
        removes fields this manager applied before and no longer does, and keeps other
        managers' fields (a sidecar another controller added). JSON is valid YAML."""
        params = {"fieldManager": FIELD_MANAGER, "force": "true"}
        if dry_run:
            params["dryRun"] = "All"
        return await self._request("PATCH", path, manifest, APPLY_PATCH, params)

    async def delete(self, path: str) -> None:
        try:
            await self._request("DELETE", path)
        except ApiError as error:
            if error.status != 404:
                raise

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            # Let the connector's transports finish closing within this loop.
            await asyncio.sleep(0)
