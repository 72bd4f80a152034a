"""The Kubernetes backend: the engines are the pods of a Deployment, and the controller follows
them into the registry and keeps the Deployment at the size it is asked for.

::

    kubectl scale ─┐
    Scale RPC ─────┼─▶ deployments/scale ─▶ Deployment ─▶ ReplicaSet ─▶ engine pods
    autoscaler ────┘          ▲ get (desired)                               │ list + watch
                              └──────────── KubernetesEnginePool ◀──────────┘
                                                   │ register / mark_draining / forget
                                                   ▼
                                            ReplicaRegistry ─▶ WatchRoutes

Kubernetes, not the controller, creates and deletes the pods, which is why this backend is not
a :class:`~controller.backend.Backend` (whose ``start``/``stop`` name the replica to act on)
but an :class:`~controller.backend.EnginePool`: its desired size *is* the Deployment's
``spec.replicas``, read back through the scale subresource, so ``kubectl scale`` moves it both
ways and a ``Scale`` order is a patch of that subresource (retried until it lands).

A pod's way through the registry (the pod's name is its replica id; the chart gives the engine
the same id through the downward API, so that its own Register and heartbeats meet this record):

- it becomes Ready (its gRPC health probe passes) with an IP and no deletion pending:
  registered READY at ``podIP:engine_port``, unless the engine registered itself first;
- it goes from Ready to not Ready, or its deletion begins (a scale-down, a rollout, an
  eviction): marked DRAINING, so gateways send it no new request while those in flight finish
  (the pod's preStop pause and termination grace period give them the time);
- it is deleted, or missing from a fresh list: forgotten.

The watch resumes from the last resourceVersion it saw (events and bookmarks) whenever the
stream ends or breaks; when the server answers 410 Gone (that version left its history), the
pool lists the pods again and reconciles the registry against the list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import httpx

from controller.kube_api import ApiError, Gone, Json, KubeApi, WatchEvent
from controller.registry import ReplicaRegistry
from switchyard.v1 import common_pb2

log = logging.getLogger(__name__)

_TRANSIENT = (httpx.HTTPError, ApiError, ValueError, KeyError)


@dataclass(frozen=True, slots=True)
class EnginePod:
    """What the pool needs of one engine pod."""

    name: str
    address: str  # podIP:engine_port; "" until the pod has an IP
    ready: bool  # its Ready condition is True
    deleting: bool  # a deletionTimestamp is set

    @property
    def routable(self) -> bool:
        return self.ready and not self.deleting and bool(self.address)


def engine_pod(pod: Json, engine_port: int) -> EnginePod:
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    ip = str(status.get("podIP") or "")
    host = f"[{ip}]" if ":" in ip else ip
    ready = any(
        condition.get("type") == "Ready" and condition.get("status") == "True"
        for condition in status.get("conditions") or []
    )
    return EnginePod(
        name=str(metadata["name"]),
        address=f"{host}:{engine_port}" if ip else "",
        ready=ready,
        deleting=bool(metadata.get("deletionTimestamp")),
    )


class KubernetesEnginePool:
    """Follows the engine pods into ``registry`` and the Deployment's scale (see the module
    docstring). ``run`` until cancelled; ``scale`` from the service or the autoscaler."""

    def __init__(
        self,
        api: KubeApi,
        registry: ReplicaRegistry,
        *,
        namespace: str,
        deployment: str,
        selector: str,
        engine_port: int,
        model: str,
        role: int = common_pb2.REPLICA_ROLE_UNSPECIFIED,
        scale_poll_s: float = 10.0,
        retry_s: float = 1.0,
        watch_timeout_s: int = 300,
    ) -> None:
        self._api = api
        self._registry = registry
        self._namespace = namespace
        self._deployment = deployment
        self._selector = selector
        self._engine_port = engine_port
        self._model = model
        self._role = role  # the role its pods run (until they register with their own)
        self._scale_poll_s = scale_poll_s
        self._retry_s = retry_s
        self._watch_timeout_s = watch_timeout_s
        self._pods: dict[str, EnginePod] = {}
        self._resource_version: str | None = None  # None: list before watching
        self._desired = 0
        self._desired_known = False  # until the scale subresource is read, or a scale order
        self._pending_scale: int | None = None
        self._scale_wake = asyncio.Event()

    @property
    def desired(self) -> int:
        """The Deployment's replicas as last read, or as last ordered while that is pending."""
        return self._desired

    @property
    def desired_known(self) -> bool:
        return self._desired_known

    def scale(self, replicas: int) -> int:
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        previous, self._desired = self._desired, replicas
        self._desired_known = True
        self._pending_scale = replicas
        self._scale_wake.set()
        return previous

    def replica_views(self) -> list[common_pb2.Replica]:
        """Registered replicas, plus the pods that are not (yet): STARTING while they come up,
        DRAINING while they are deleted."""
        views = {r.replica_id: r for r in self._registry.replicas() if self._owns(r)}
        for pod in self._pods.values():
            if pod.name not in views:
                state = (
                    common_pb2.REPLICA_STATE_DRAINING
                    if pod.deleting
                    else common_pb2.REPLICA_STATE_STARTING
                )
                views[pod.name] = common_pb2.Replica(
                    replica_id=pod.name, address=pod.address, state=state
                )
        return [views[name] for name in sorted(views)]

    def _owns(self, replica: common_pb2.Replica) -> bool:
        """Whether a registered replica is one of this pool's pods (pools share the
        registry; each shows its own)."""
        return replica.replica_id in self._pods or replica.role == self._role

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._follow_pods())
            tasks.create_task(self._follow_scale())

    # -- pods

    async def _follow_pods(self) -> None:
        while True:
            try:
                if self._resource_version is None:
                    await self._relist()
                assert self._resource_version is not None
                async for event in self._api.watch_pods(
                    self._namespace, self._selector, self._resource_version, self._watch_timeout_s
                ):
                    self._apply(event)
                log.debug("pod watch ended; resuming", extra={"from": self._resource_version})
            except Gone:
                log.info("pod watch expired (410); listing again")
                self._resource_version = None
            except _TRANSIENT as exc:
                log.warning(
                    "pod watch failed; resuming",
                    extra={"error": repr(exc), "from": self._resource_version},
                )
                await asyncio.sleep(self._retry_s)

    async def _relist(self) -> None:
        items, resource_version = await self._api.list_pods(self._namespace, self._selector)
        listed = {pod.name: pod for pod in (engine_pod(i, self._engine_port) for i in items)}
        for name in sorted(set(self._pods) - set(listed)):
            self._update(name, None)
        for name in sorted(listed):
            self._update(name, listed[name])
        self._resource_version = resource_version
        log.info("engine pods listed", extra={"pods": sorted(listed), "rv": resource_version})

    def _apply(self, event: WatchEvent) -> None:
        if event.type == "DELETED":
            self._update(str(event.object["metadata"]["name"]), None)
        elif event.type in ("ADDED", "MODIFIED"):
            pod = engine_pod(event.object, self._engine_port)
            self._update(pod.name, pod)
        if event.resource_version:  # BOOKMARKs only move this on
            self._resource_version = event.resource_version

    def _update(self, name: str, pod: EnginePod | None) -> None:
        before = self._pods.get(name)
        if pod is None:
            self._pods.pop(name, None)
            self._registry.forget(name)
            log.info("engine pod gone", extra={"replica_id": name})
            self._scale_wake.set()  # a scale change may be why: read it now
            return
        self._pods[name] = pod
        if before is None or before.deleting != pod.deleting:
            self._scale_wake.set()
        was_routable = before is not None and before.routable
        if pod.routable and not was_routable:
            # Ready again: lift the drain mark, which outlives the record when the engine
            # deregistered (or went silent) meanwhile, as a restarted container does.
            self._registry.lift_draining(name)
            if self._registry.get(name) is None:
                self._registry.register(
                    common_pb2.Replica(
                        replica_id=name, address=pod.address, model=self._model, role=self._role
                    )
                )
            log.info("engine pod ready", extra={"replica_id": name, "address": pod.address})
        elif not pod.routable and (was_routable or pod.deleting):
            self._registry.mark_draining(name)  # sticky until the pod is gone or ready again
            if was_routable or before is None or not before.deleting:
                log.info(
                    "engine pod draining",
                    extra={"replica_id": name, "deleting": pod.deleting, "ready": pod.ready},
                )

    # -- deployments/scale

    async def _follow_scale(self) -> None:
        while True:
            self._scale_wake.clear()
            try:
                await self._sync_scale()
            except _TRANSIENT as exc:
                log.warning("engine deployment scale failed", extra={"error": repr(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._scale_wake.wait(), timeout=self._scale_poll_s)

    async def _sync_scale(self) -> None:
        target = self._pending_scale
        if target is not None:
            await self._api.patch_scale(self._namespace, self._deployment, target)
            log.info("engine deployment scaled", extra={"replicas": target})
            if self._pending_scale == target:  # no newer order came in meanwhile
                self._pending_scale = None
        observed = await self._api.get_scale(self._namespace, self._deployment)
        if self._pending_scale is None and observed != self._desired:
            log.info(
                "engine deployment size changed",
                extra={"previous": self._desired, "desired": observed},
            )
            self._desired = observed
        self._desired_known = True
