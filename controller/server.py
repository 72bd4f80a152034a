"""The controller's gRPC service and process: ``python -m controller [flags]``.

``ControllerService`` fronts the :class:`~controller.registry.ReplicaRegistry` (Register,
Heartbeat, Deregister, ListReplicas), streams the routing table to gateways (WatchRoutes) and
takes scale orders for the :class:`~controller.reconciler.Reconciler` (Scale). The process
serves that plus the standard gRPC health service; on SIGTERM or SIGINT it stops its engines
(graceful, then forced) while still answering their Deregister calls, then exits.

With ``backend=kubernetes`` the pool is a :class:`~controller.kubernetes_backend.KubernetesEnginePool`
(plus the optional :class:`~controller.autoscaler.Autoscaler`), and with ``leader_election``
the process first waits for the controller Lease: meanwhile its overall health is SERVING (it
is alive) and ControllerService's NOT_SERVING (not ready, so its Service sends it nothing). A
leader that loses the Lease exits with status 1 and comes back as a candidate.

With the local backend, an engine that cannot start (it exited with
:data:`~switchyard.exit_codes.CANNOT_START`: a bad flag, an unsupported model, missing files)
stops the controller, which logs the engine's own message and exits with that same status,
so that ``switchyard up`` ends with the message instead of watching a restart loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from controller.autoscaler import AutoscalePolicy, Autoscaler
from controller.backend import EnginePool
from controller.kube_api import KubeApi, current_namespace
from controller.kubernetes_backend import KubernetesEnginePool
from controller.leader import LeadershipLost, LeaseElector
from controller.local_backend import LocalEngineSpec, LocalProcessBackend
from controller.lora_fleet import FleetError, LoRAFleet
from controller.plan import RestartPolicy
from controller.reconciler import (
    DECODE_POOL,
    ENGINE_POOL,
    POOL_ROLES,
    PREFILL_POOL,
    EngineCannotStart,
    Reconciler,
)
from controller.registry import ReplicaRegistry
from switchyard.exit_codes import CANNOT_START
from switchyard.grpc_utils import GrpcServer, create_server
from switchyard.log import setup_logging
from switchyard.settings import ControllerSettings, load_settings
from switchyard.v1 import common_pb2, controller_pb2, controller_pb2_grpc, engine_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "switchyard.v1.ControllerService"
RECONCILE_INTERVAL_S = 1.0


class RouteFeed:
    """Wakes every WatchRoutes stream when the registry's routing table changes.

    ``settle_s``: a controller that has just started has not heard from the engines that were
    already serving (it restarted; they register again at their next heartbeat), so its table
    is empty or partial. Streams get their first table only ``settle_s`` after the feed was
    made, so that gateways keep routing on the table they had instead of an empty one.
    """

    def __init__(self, settle_s: float = 0.0) -> None:
        self._waiters: set[asyncio.Event] = set()
        self._settled_at = time.monotonic() + settle_s

    def notify(self) -> None:
        for waiter in self._waiters:
            waiter.set()

    async def follow(self, registry: ReplicaRegistry) -> AsyncIterator[controller_pb2.RoutingTable]:
        """The current table, then every newer one; versions seen in between are skipped."""
        settling = self._settled_at - time.monotonic()
        if settling > 0:
            await asyncio.sleep(settling)
        waiter = asyncio.Event()
        self._waiters.add(waiter)
        try:
            sent = 0
            while True:
                waiter.clear()  # before reading the version, so no change is missed
                if registry.version != sent:
                    table = registry.routing_table()
                    sent = table.version
                    yield table
                else:
                    await waiter.wait()
        finally:
            self._waiters.discard(waiter)


class ControllerServicer(controller_pb2_grpc.ControllerServiceServicer):
    """The wire side of the registry and the engine pools (reconcilers, or Kubernetes pools)
    by name: ``engines``, and with disaggregation ``prefill-engines`` and ``decode-engines``.
    ``reconciler`` is None (or empty) when nothing keeps a pool (engines register from
    elsewhere and Scale is refused); a single pool stands for ``engines``."""

    def __init__(
        self,
        registry: ReplicaRegistry,
        feed: RouteFeed,
        reconciler: EnginePool | dict[str, EnginePool] | None,
        heartbeat_interval_s: float,
        lora: LoRAFleet | None = None,
    ) -> None:
        self._registry = registry
        self._feed = feed
        if reconciler is None:
            reconciler = {}
        elif not isinstance(reconciler, dict):
            reconciler = {ENGINE_POOL: reconciler}
        self._pools: dict[str, EnginePool] = reconciler
        self._heartbeat_interval_s = heartbeat_interval_s
        self._lora = lora or LoRAFleet(registry)
        self._catch_ups: set[asyncio.Task[None]] = set()

    async def Register(
        self, request: controller_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> controller_pb2.RegisterResponse:
        try:
            self._registry.register(request.replica)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        replica = request.replica
        log.info(
            "replica registered",
            extra={"replica_id": replica.replica_id, "address": replica.address},
        )
        self._lora.observe(replica.replica_id, list(replica.lora_adapters))
        self._lora.replan()
        if replica.max_loras:
            # Adapters loaded at runtime before this replica came: it gets them too.
            task = asyncio.create_task(self._lora.catch_up(replica.replica_id))
            self._catch_ups.add(task)
            task.add_done_callback(self._catch_ups.discard)
        return controller_pb2.RegisterResponse(heartbeat_interval_s=self._heartbeat_interval_s)

    async def Heartbeat(
        self, request: controller_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> controller_pb2.HeartbeatResponse:
        known = self._registry.heartbeat(request.replica_id, request.load, request.lora_adapters)
        if not known:
            log.info("heartbeat from unknown replica", extra={"replica_id": request.replica_id})
        elif request.lora_adapters:
            self._lora.observe(request.replica_id, list(request.lora_adapters))
            self._lora.replan()
        return controller_pb2.HeartbeatResponse(known=known)

    async def Deregister(
        self, request: controller_pb2.DeregisterRequest, context: grpc.aio.ServicerContext
    ) -> controller_pb2.DeregisterResponse:
        if self._registry.deregister(request.replica_id):
            log.info("replica deregistered", extra={"replica_id": request.replica_id})
            self._lora.replan()
        return controller_pb2.DeregisterResponse()

    async def WatchRoutes(
        self, request: controller_pb2.WatchRoutesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[controller_pb2.RoutingTable]:
        log.info("gateway watching routes", extra={"gateway_id": request.gateway_id})
        async for table in self._feed.follow(self._registry):
            yield table

    async def ListReplicas(
        self, request: controller_pb2.ListReplicasRequest, context: grpc.aio.ServicerContext
    ) -> controller_pb2.ListReplicasResponse:
        if not self._pools:
            return controller_pb2.ListReplicasResponse(replicas=self._registry.replicas())
        views = {r.replica_id: r for r in self._registry.replicas()}
        for pool in self._pools.values():
            for view in pool.replica_views():  # registered replicas, and those still coming
                views.setdefault(view.replica_id, view)
        ordered = sorted(views, key=lambda i: (len(i), i))
        return controller_pb2.ListReplicasResponse(
            replicas=[views[replica_id] for replica_id in ordered],
            desired={name: pool.desired for name, pool in self._pools.items()},
        )

    async def Scale(
        self, request: controller_pb2.ScaleRequest, context: grpc.aio.ServicerContext
    ) -> controller_pb2.ScaleResponse:
        if not self._pools:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this controller runs with backend=none: engines are started elsewhere",
            )
        pool = self._pools.get(request.pool)
        if pool is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown pool {request.pool!r}; the pools are: {', '.join(self._pools)}",
            )
        assert pool is not None  # context.abort raised otherwise
        previous = pool.scale(request.replicas)
        log.info(
            "scale", extra={"pool": request.pool, "previous": previous, "desired": request.replicas}
        )
        return controller_pb2.ScaleResponse(previous=previous, desired=request.replicas)

    async def LoadLoRAAdapter(
        self, request: engine_pb2.LoadLoRAAdapterRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.LoadLoRAAdapterResponse:
        if not request.lora_name or not request.lora_path:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "lora_name and lora_path are required"
            )
        try:
            await self._lora.load(request)
        except FleetError as exc:
            await context.abort(exc.code, exc.details)
        log.info("LoRA adapter loaded on the fleet", extra={"lora_name": request.lora_name})
        return engine_pb2.LoadLoRAAdapterResponse()

    async def UnloadLoRAAdapter(
        self, request: engine_pb2.UnloadLoRAAdapterRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.UnloadLoRAAdapterResponse:
        try:
            await self._lora.unload(request)
        except FleetError as exc:
            await context.abort(exc.code, exc.details)
        log.info("LoRA adapter unloaded from the fleet", extra={"lora_name": request.lora_name})
        return engine_pb2.UnloadLoRAAdapterResponse()


def reachable_address(host: str, port: int) -> str:
    """The address local clients (engines) use for a server bound to ``host:port``."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def make_backend(
    settings: ControllerSettings, controller_address: str, pool: str = ENGINE_POOL
) -> LocalProcessBackend | None:
    """The local backend of ``pool``, or None for ``none`` (``kubernetes``: see
    :func:`kubernetes_parts`)."""
    if settings.backend != "local":
        return None
    spec = LocalEngineSpec(
        command=settings.engine_command,
        model=settings.model,
        controller_address=controller_address,
        data_dir=settings.data_dir.expanduser(),
        host=settings.engine_host,
        base_port=settings.engine_base_port,
        base_metrics_port=settings.engine_base_metrics_port,
        served_model_name=settings.served_model_name,
        extra_args=tuple(settings.engine_args),
        log_level=settings.log_level,
        run_dir=settings.run_dir.expanduser() if settings.run_dir else None,
        pool=pool,
        role=POOL_ROLES[pool],
    )
    return LocalProcessBackend(spec)


def lora_state_file(settings: ControllerSettings) -> Path:
    """Where runtime-loaded LoRA adapters are remembered across controller restarts: beside
    the stack's other run files (its own ``run_dir`` when stacks share a data dir)."""
    return (settings.run_dir or settings.data_dir).expanduser() / "lora_adapters.json"


def kubernetes_parts(
    settings: ControllerSettings, registry: ReplicaRegistry
) -> tuple[KubeApi, KubernetesEnginePool | None, Autoscaler | None]:
    """The API client, the pool that follows the engine Deployment (None when
    ``engine_deployment`` is empty: disaggregated engines only), and the autoscaler when
    ``settings.autoscale`` is on."""
    api = KubeApi(settings.kubernetes_api) if settings.kubernetes_api else KubeApi.in_cluster()
    pool = kubernetes_pool(api, settings, registry, ENGINE_POOL)
    if pool is None:
        return api, None, None
    autoscaler = None
    if settings.autoscale:
        policy = AutoscalePolicy(
            min_replicas=settings.autoscale_min,
            max_replicas=settings.autoscale_max,
            target_waiting=settings.autoscale_target_waiting,
            target_kv_usage=settings.autoscale_target_kv_usage,
            cooldown_s=settings.autoscale_cooldown_s,
        )
        autoscaler = Autoscaler(pool, registry, policy)
    return api, pool, autoscaler


_ROLE_ENUMS = {
    ENGINE_POOL: common_pb2.REPLICA_ROLE_UNSPECIFIED,
    PREFILL_POOL: common_pb2.REPLICA_ROLE_PREFILL,
    DECODE_POOL: common_pb2.REPLICA_ROLE_DECODE,
}


def kubernetes_pool(
    api: KubeApi, settings: ControllerSettings, registry: ReplicaRegistry, pool: str
) -> KubernetesEnginePool | None:
    """The pool following ``pool``'s Deployment; None for a disaggregation pool whose
    Deployment is not configured. The chart labels each Deployment's pods with its role."""
    deployment = {
        ENGINE_POOL: settings.engine_deployment,
        PREFILL_POOL: settings.prefill_engine_deployment,
        DECODE_POOL: settings.decode_engine_deployment,
    }[pool]
    if not deployment:
        return None
    selector = settings.engine_selector
    if pool != ENGINE_POOL:
        selector = f"{selector},switchyard.dev/role={POOL_ROLES[pool]}"
    return KubernetesEnginePool(
        api,
        registry,
        namespace=current_namespace(settings.kubernetes_namespace),
        deployment=deployment,
        selector=selector,
        engine_port=settings.engine_port,
        model=settings.served_model_name or settings.model,
        role=_ROLE_ENUMS[pool],
    )


async def _lead_or_stop(elector: LeaseElector, server: GrpcServer, stop: asyncio.Event) -> bool:
    """Alive but not ready until this replica leads; False when a stop came first."""
    await server.health.set("", health_pb2.HealthCheckResponse.SERVING)
    acquire = asyncio.create_task(elector.acquire())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
    leading = acquire.done() and not acquire.cancelled()
    for task in (acquire, stopped):
        task.cancel()
    await asyncio.gather(acquire, stopped, return_exceptions=True)
    return leading


async def _hold(elector: LeaseElector, lost: list[LeadershipLost], stop: asyncio.Event) -> None:
    """Renews the Lease; on losing it, records why and stops the process."""
    try:
        await elector.hold()
    except LeadershipLost as exc:
        lost.append(exc)
        stop.set()


def _stop_when_failed(
    task: asyncio.Task[None], failures: list[BaseException], stop: asyncio.Event
) -> None:
    """Done-callback of a background task: one that ended with an error stops the process."""
    if not task.cancelled() and task.exception() is not None:
        failures.append(task.exception())  # type: ignore[arg-type]
        stop.set()


async def serve(settings: ControllerSettings) -> None:
    """Runs the controller until SIGTERM or SIGINT; raises :class:`LeadershipLost` when it
    led and lost the Lease, and :class:`EngineCannotStart` when an engine cannot start."""
    if settings.leader_election and settings.backend != "kubernetes":
        raise NotImplementedError("leader_election needs backend=kubernetes")
    # Two heartbeats: every engine that outlived a previous controller has registered again.
    feed = RouteFeed(settle_s=2 * settings.heartbeat_interval_s)
    registry = ReplicaRegistry(
        unhealthy_after_s=settings.unhealthy_after_s,
        remove_after_s=settings.remove_after_s,
        on_change=feed.notify,
    )
    server = create_server(settings.host, settings.port, [SERVICE_NAME])
    background: list[Coroutine[Any, Any, None]] = []
    api: KubeApi | None = None
    backends: list[LocalProcessBackend] = []
    pools: dict[str, EnginePool] = {}
    if settings.backend == "kubernetes":
        api, engine_pool, autoscaler = kubernetes_parts(settings, registry)
        if engine_pool is not None:
            pools[ENGINE_POOL] = engine_pool
            background.append(engine_pool.run())
        if autoscaler is not None:
            background.append(autoscaler.run())
        for name in (PREFILL_POOL, DECODE_POOL):
            role_pool = kubernetes_pool(api, settings, registry, name)
            if role_pool is not None:
                pools[name] = role_pool
                background.append(role_pool.run())
    elif settings.backend == "local":
        sizes = {
            ENGINE_POOL: settings.engines,
            PREFILL_POOL: settings.prefill_engines,
            DECODE_POOL: settings.decode_engines,
        }
        for name, size in sizes.items():
            backend = make_backend(settings, reachable_address(settings.host, server.port), name)
            assert backend is not None
            backends.append(backend)
            # A controller restarted within a running stack keeps the size it was scaled to.
            desired = size if backend.adopted_desired is None else backend.adopted_desired
            reconciler = Reconciler(
                registry,
                backend,
                desired,
                RestartPolicy(),
                RECONCILE_INTERVAL_S,
                on_scale=backend.record_desired,
                pool=name,
            )
            pools[name] = reconciler
            background.append(reconciler.run())
    controller_pb2_grpc.add_ControllerServiceServicer_to_server(
        ControllerServicer(
            registry,
            feed,
            pools,
            settings.heartbeat_interval_s,
            LoRAFleet(registry, lora_state_file(settings)),
        ),
        server.server,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    await server.start()
    elector = None
    leading = True
    if settings.leader_election:
        assert api is not None
        elector = LeaseElector(
            api,
            current_namespace(settings.kubernetes_namespace),
            settings.lease_name,
            f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}",
            settings.lease_duration_s,
        )
        leading = await _lead_or_stop(elector, server, stop)
    lost: list[LeadershipLost] = []
    failures: list[BaseException] = []
    tasks: list[asyncio.Task[None]] = []
    if leading:
        if elector is not None:
            background.append(_hold(elector, lost, stop))
        tasks = [asyncio.create_task(work) for work in background]
        for task in tasks:
            task.add_done_callback(lambda done: _stop_when_failed(done, failures, stop))
        await server.set_serving(True)
        log.info(
            "controller serving",
            extra={"port": server.port, "backend": settings.backend, "engines": settings.engines},
        )
    else:
        for work in background:
            work.close()  # never started
    await stop.wait()
    log.info("controller stopping")
    for task in tasks:
        task.cancel()
    # Their failures, if any, are in ``failures`` already (the done-callback).
    await asyncio.gather(*tasks, return_exceptions=True)
    # Engines deregister while the server still answers.
    await asyncio.gather(*(backend.close() for backend in backends))
    if elector is not None and not lost:
        await elector.release()
    if api is not None:
        await api.aclose()
    await server.stop(grace_s=1.0)
    log.info("controller stopped")
    if lost:
        raise lost[0]
    if failures:
        raise failures[0]


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(ControllerSettings, argv, prog="python -m controller")
    setup_logging("controller", settings.log_level)
    try:
        asyncio.run(serve(settings))
    except NotImplementedError as exc:
        log.error(str(exc))
        return 2
    except LeadershipLost as exc:
        log.error("lost leadership; exiting to start again as a candidate: %s", exc)
        return 1
    except EngineCannotStart as exc:
        log.error(
            "engine cannot start; stopping instead of restarting it: %s",
            exc.message,
            extra={"replica_id": exc.replica_id},
        )
        # Plain text too: ``switchyard up`` shows the end of this log to the user.
        print(f"{exc.replica_id} cannot start: {exc.message}", file=sys.stderr, flush=True)
        return CANNOT_START
    return 0


if __name__ == "__main__":
    sys.exit(main())
