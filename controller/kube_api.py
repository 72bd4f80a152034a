"""The few Kubernetes API calls the controller makes, over plain HTTP with ``httpx``.

Pods (list and watch, by label), the scale subresource of a Deployment (get and patch) and
coordination Leases (get, create, replace). In a pod, :meth:`KubeApi.in_cluster` reaches the
API server named by ``KUBERNETES_SERVICE_HOST``/``_PORT`` with the pod's service-account token
(read again for every request: the kubelet rotates it) and CA; anywhere else a base URL such
as ``kubectl proxy``'s ``http://127.0.0.1:8001`` does.

A watch yields :class:`WatchEvent` lines until the server ends the stream. A watch whose
``resourceVersion`` is too old for the server to replay from fails with :class:`Gone` (HTTP 410,
either as the response status or as an ``ERROR`` event): the caller lists again.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
REQUEST_TIMEOUT_S = 10.0
# A watch is read with a deadline past the server's own timeoutSeconds, so that a connection
# that went silent (a dead API server, a dropped NAT entry) ends and is resumed.
WATCH_READ_SLACK_S = 30.0

Json = dict[str, Any]


class ApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class Gone(ApiError):
    """410: the resourceVersion is no longer in the server's history; list again."""


class Conflict(ApiError):
    """409: someone else changed (or created) the object first."""


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED or BOOKMARK
    object: Json

    @property
    def resource_version(self) -> str:
        return str(self.object.get("metadata", {}).get("resourceVersion", ""))


def _error_for(status: int, message: str) -> ApiError:
    if status == 410:
        return Gone(status, message)
    if status == 409:
        return Conflict(status, message)
    return ApiError(status, message)


def _raise_for(response: httpx.Response, body: str) -> None:
    if response.status_code < 400:
        return
    try:
        message = str(json.loads(body).get("message", body))
    except ValueError:
        message = body
    raise _error_for(response.status_code, message[:500])


class KubeApi:
    """An async client for the calls the controller needs; ``token`` is a bearer token or
    None, ``token_file`` a file to read it from before every request."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        token_file: Path | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self._token = token
        self._token_file = token_file
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), verify=verify, timeout=REQUEST_TIMEOUT_S
        )

    @classmethod
    def in_cluster(cls) -> KubeApi:
        """The API server of the cluster this pod runs in, as its service account."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise RuntimeError(
                "KUBERNETES_SERVICE_HOST is not set: not in a pod; set kubernetes_api instead"
            )
        if ":" in host:  # an IPv6 address
            host = f"[{host}]"
        context = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT_DIR / "ca.crt"))
        return cls(
            f"https://{host}:{port}", token_file=SERVICE_ACCOUNT_DIR / "token", verify=context
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def _headers(self) -> dict[str, str]:
        token = self._token
        if self._token_file is not None:
            token = self._token_file.read_text().strip()
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Json | None = None,
        content_type: str = "application/json",
    ) -> Json:
        headers = self._headers()
        content = None
        if body is not None:
            headers["Content-Type"] = content_type
            content = json.dumps(body)
        response = await self._client.request(
            method, path, params=params, content=content, headers=headers
        )
        _raise_for(response, response.text)
        result: Json = response.json()
        return result

    # -- pods

    async def list_pods(self, namespace: str, selector: str) -> tuple[list[Json], str]:
        """The pods matching ``selector`` and the list's resourceVersion to watch from."""
        pods = await self._request(
            "GET", f"/api/v1/namespaces/{namespace}/pods", params={"labelSelector": selector}
        )
        return list(pods.get("items") or []), str(pods["metadata"]["resourceVersion"])

    async def watch_pods(
        self, namespace: str, selector: str, resource_version: str, timeout_s: int
    ) -> AsyncIterator[WatchEvent]:
        """Changes to the matching pods after ``resource_version``, until the server ends the
        watch (after about ``timeout_s``) or the connection drops."""
        params = {
            "labelSelector": selector,
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_s),
        }
        timeout = httpx.Timeout(REQUEST_TIMEOUT_S, read=timeout_s + WATCH_READ_SLACK_S)
        async with self._client.stream(
            "GET",
            f"/api/v1/namespaces/{namespace}/pods",
            params=params,
            headers=self._headers(),
            timeout=timeout,
        ) as response:
            if response.status_code >= 400:
                _raise_for(response, (await response.aread()).decode(errors="replace"))
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                if event["type"] == "ERROR":
                    status = event.get("object") or {}
                    raise _error_for(int(status.get("code", 500)), str(status.get("message")))
                yield WatchEvent(event["type"], event["object"])

    # -- deployments/scale

    def _scale_path(self, namespace: str, deployment: str) -> str:
        return f"/apis/apps/v1/namespaces/{namespace}/deployments/{deployment}/scale"

    async def get_scale(self, namespace: str, deployment: str) -> int:
        """The Deployment's desired replicas (``spec.replicas`` of its scale)."""
        scale = await self._request("GET", self._scale_path(namespace, deployment))
        return int(scale.get("spec", {}).get("replicas", 0))

    async def patch_scale(self, namespace: str, deployment: str, replicas: int) -> int:
        """Sets the Deployment's desired replicas; returns what the server stored."""
        scale = await self._request(
            "PATCH",
            self._scale_path(namespace, deployment),
            body={"spec": {"replicas": replicas}},
            content_type="application/merge-patch+json",
        )
        return int(scale.get("spec", {}).get("replicas", 0))

    # -- coordination.k8s.io/v1 leases

    def _leases_path(self, namespace: str) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"

    async def get_lease(self, namespace: str, name: str) -> Json | None:
        try:
            return await self._request("GET", f"{self._leases_path(namespace)}/{name}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def create_lease(self, namespace: str, lease: Json) -> Json:
        """Creates it; :class:`Conflict` when it exists already."""
        return await self._request("POST", self._leases_path(namespace), body=lease)

    async def replace_lease(self, namespace: str, lease: Json) -> Json:
        """Replaces it; :class:`Conflict` when its resourceVersion is no longer current."""
        name = lease["metadata"]["name"]
        return await self._request("PUT", f"{self._leases_path(namespace)}/{name}", body=lease)


def current_namespace(configured: str) -> str:
    """``configured``, else the namespace of the pod this runs in."""
    if configured:
        return configured
    path = SERVICE_ACCOUNT_DIR / "namespace"
    if not path.is_file():
        raise RuntimeError("no namespace configured and not in a pod: set kubernetes_namespace")
    return path.read_text().strip()
