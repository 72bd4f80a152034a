"""The engine service: one replica, a ``grpc.aio`` server around one in-process
:class:`LLMEngine`.

:class:`EngineServer` assembles the parts, each in its own module:

- :mod:`engine_service.engine_loop`: the thread that drives the engine, and its commands;
- :mod:`engine_service.servicer`: the ``EngineService`` handlers on the event loop;
- :mod:`engine_service.mappings`: wire messages and settings to the engine's types;
- :mod:`engine_service.metrics`: the Prometheus registry (vLLM's names);
- :mod:`engine_service.kv_event_hub`: KV events fanned out to ``WatchKVEvents`` streams;
- :mod:`engine_service.controller_link`: registration and heartbeats.

With ``kv_service_address`` set, the engine's offload tiers reach the KV service through
:mod:`engine_service.kv_connector`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time

from engine_service.controller_link import ControllerLink
from engine_service.engine import EngineStats, LLMEngine
from engine_service.engine_loop import EngineLoop
from engine_service.kv_connector import KVServiceStore
from engine_service.lora_service import adapter_infos
from engine_service.mappings import engine_config_from_settings, load_from_stats
from engine_service.metrics import EngineMetrics
from engine_service.servicer import EngineServicer
from switchyard.demo import resolve_model
from switchyard.grpc_utils import GrpcServer, create_server, serve_until_signalled
from switchyard.metrics import MetricsServer, start_metrics_server
from switchyard.settings import EngineSettings
from switchyard.v1 import common_pb2, engine_pb2, engine_pb2_grpc

logger = logging.getLogger(__name__)

ENGINE_SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["EngineService"].full_name
SHUTDOWN_GRACE_S = 5.0

ROLES = {
    "both": common_pb2.REPLICA_ROLE_UNSPECIFIED,
    "prefill": common_pb2.REPLICA_ROLE_PREFILL,
    "decode": common_pb2.REPLICA_ROLE_DECODE,
}

__all__ = ["EngineServer", "engine_config_from_settings", "serve"]


# The request size the default queue bound counts the KV pool in.
QUEUE_REFERENCE_TOKENS = 256


def default_max_queued_requests(max_num_seqs: int, block_size: int, stats: EngineStats) -> int:
    """The waiting-queue bound when none is configured: as many requests as the KV pool
    holds at :data:`QUEUE_REFERENCE_TOKENS` tokens each (a request waits for blocks as much
    as for a place in the batch), and at least ``max_num_seqs``. Beyond it a request would
    only wait for the pool to turn over several times; refusing it lets the client go to
    another replica or come back."""
    pool_tokens = stats.num_blocks_total * block_size
    return max(max_num_seqs, pool_tokens // QUEUE_REFERENCE_TOKENS, 1)


class EngineServer:
    """One engine replica: loads the model, serves EngineService, health and /metrics, and
    registers with the controller. ``start`` then ``stop``; ``port`` and ``metrics_port``
    are the bound ports once started."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.model_name = settings.served_model_name or settings.model
        self.port = 0
        self.metrics_port = 0
        self.replica_id = settings.replica_id
        self._engine: LLMEngine | None = None
        self._kv_store: KVServiceStore | None = None
        self._engine_loop: EngineLoop | None = None
        self._servicer: EngineServicer | None = None
        self._max_model_len = 0
        self._grpc: GrpcServer | None = None
        self._metrics_server: MetricsServer | None = None
        self._controller: ControllerLink | None = None
        self._controller_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        settings = self.settings
        model_path = await asyncio.to_thread(resolve_model, settings.model, settings.data_dir)
        config = engine_config_from_settings(settings, model_path)
        if settings.role != "both" and (
            config.tensor_parallel_size > 1 or config.data_parallel_size > 1
        ):
            # A hand-off moves one process's blocks; a split engine's KV lives in several.
            raise ValueError(
                f"--role {settings.role} is not supported with --tensor-parallel-size or "
                "--data-parallel-size above 1 yet: KV hand-off moves one rank's blocks only"
            )
        logger.info("loading model %s on %s", model_path, config.device)
        if settings.kv_service_address and config.enable_kv_offload:
            self._kv_store = KVServiceStore(settings.kv_service_address)
        engine = await asyncio.to_thread(LLMEngine, config, self._kv_store)
        self._engine = engine

        grpc_server = create_server(settings.host, settings.port, [ENGINE_SERVICE_NAME])
        self._grpc = grpc_server
        self.port = grpc_server.port
        self.replica_id = self.replica_id or f"engine-{socket.gethostname()}-{self.port}"

        metrics = EngineMetrics(self.model_name, lambda: self._current_stats())
        max_queued = settings.max_queued_requests
        if max_queued is None:
            max_queued = default_max_queued_requests(
                engine.max_num_seqs, config.block_size, engine.stats()
            )
        servicer = EngineServicer(
            self.replica_id,
            self.model_name,
            engine.max_model_len,
            config.block_size,
            metrics,
            max_queued_requests=max_queued,
            max_num_seqs=engine.max_num_seqs,  # all data-parallel ranks together
            role=ROLES[settings.role],
            kv_transfer_timeout_s=settings.kv_transfer_timeout_s,
        )
        metrics.role.labels(self.model_name, settings.role).set(1)
        self._servicer = servicer
        engine_loop = EngineLoop(
            engine,
            asyncio.get_running_loop(),
            servicer.deliver,
            servicer.reject,
            servicer.fail_all,
            on_kv_events=servicer.kv_events.publish,
            on_handoff=servicer.deliver_handoff,
        )
        servicer.attach_engine(engine_loop, engine)
        self._engine_loop = engine_loop
        self._max_model_len = engine.max_model_len
        engine_pb2_grpc.add_EngineServiceServicer_to_server(servicer, grpc_server.server)

        self._metrics_server = start_metrics_server(
            settings.metrics_port, metrics.registry, settings.host
        )
        self.metrics_port = self._metrics_server.port
        engine_loop.start()
        await grpc_server.start()
        await grpc_server.set_serving(True)
        logger.info(
            "engine serving",
            extra={
                "replica_id": self.replica_id,
                "port": self.port,
                "metrics_port": self.metrics_port,
                "model": self.model_name,
                "max_model_len": engine.max_model_len,
                "max_queued_requests": max_queued,
                "role": settings.role,
            },
        )
        if settings.controller_address:
            self._controller = ControllerLink(
                settings.controller_address, self._replica, settings.heartbeat_interval_s
            )
            self._controller_task = asyncio.create_task(self._controller.run())

    def _current_stats(self) -> EngineStats:
        assert self._engine_loop is not None
        return self._engine_loop.stats

    def _advertise_host(self) -> str:
        if self.settings.advertise_host:
            return self.settings.advertise_host
        if self.settings.host in ("", "0.0.0.0", "::", "[::]"):
            return "127.0.0.1"
        return self.settings.host

    def _replica(self) -> common_pb2.Replica:
        host = self._advertise_host()
        lora = self._current_stats().lora
        return common_pb2.Replica(
            replica_id=self.replica_id,
            address=f"{host}:{self.port}",
            model=self.model_name,
            role=ROLES[self.settings.role],
            kv_fingerprint=self._engine.kv_fingerprint if self._engine is not None else b"",
            state=common_pb2.REPLICA_STATE_READY,
            load=self._servicer.load()
            if self._servicer
            else load_from_stats(self._current_stats()),
            max_model_len=self._max_model_len,
            metrics_address=f"{host}:{self.metrics_port}",
            last_heartbeat_unix=time.time(),
            adapters=[a.name for a in lora.adapters if a.resident] if lora is not None else [],
            lora_adapters=adapter_infos(lora),
            max_loras=lora.max_loras if lora is not None else 0,
        )

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """NOT_SERVING, deregister, drain for ``grace_s`` (then cancel), stop the engine."""
        logger.info("engine shutting down")
        if self._grpc is not None:
            await self._grpc.set_serving(False)
        if self._controller_task is not None:
            self._controller_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._controller_task
        if self._controller is not None:
            await self._controller.deregister(self.replica_id)
        if self._grpc is not None:
            await self._grpc.stop(grace_s)
        if self._servicer is not None:
            await self._servicer.close()
        if self._engine_loop is not None:
            await asyncio.to_thread(self._engine_loop.stop)
        if self._engine is not None:
            await asyncio.to_thread(self._engine.close)
        if self._kv_store is not None:
            self._kv_store.close()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        logger.info("engine stopped")


async def serve(settings: EngineSettings) -> None:
    """Run a replica until SIGTERM or SIGINT, then shut it down gracefully."""
    server = EngineServer(settings)
    await serve_until_signalled(server.start, server.stop)
