"""Where the routing table comes from: the controller, or a fixed list of engines.

:class:`ControllerRoutes` follows the controller's ``WatchRoutes`` stream. When the stream
drops it reconnects with exponential backoff and keeps routing on the last table meanwhile,
so a controller restart does not interrupt traffic. :class:`StaticRoutes` serves a fixed
list of engine addresses without a controller, polling each engine's ``GetStats`` for its
load; an engine that does not answer is not READY until it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import grpc

from gateway.routing import Replica
from switchyard.grpc_utils import insecure_channel
from switchyard.v1 import controller_pb2, controller_pb2_grpc, engine_pb2, engine_pb2_grpc

logger = logging.getLogger(__name__)


class ControllerRoutes:
    """The routing table as the controller streams it."""

    def __init__(
        self,
        controller_address: str,
        gateway_id: str,
        *,
        initial_backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
    ) -> None:
        self._address = controller_address
        self._gateway_id = gateway_id
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._replicas: tuple[Replica, ...] = ()
        self._version = 0
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None

    def replicas(self) -> Sequence[Replica]:
        return self._replicas

    async def start(self) -> None:
        self._channel = insecure_channel(self._address)
        self._task = asyncio.create_task(self._follow(self._channel), name="watch-routes")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._channel is not None:
            await self._channel.close()

    async def _follow(self, channel: grpc.aio.Channel) -> None:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        backoff = self._initial_backoff_s
        while True:
            try:
                stream = stub.WatchRoutes(
                    controller_pb2.WatchRoutesRequest(gateway_id=self._gateway_id)
                )
                async for table in stream:
                    self._apply(table)
                    backoff = self._initial_backoff_s
                logger.warning(
                    "routing table stream ended; reconnecting", extra={"controller": self._address}
                )
            except grpc.aio.AioRpcError as exc:
                logger.warning(
                    "routing table stream failed; keeping the last table",
                    extra={
                        "controller": self._address,
                        "code": exc.code().name,
                        "detail": exc.details(),
                    },
                )
            except Exception:
                # Anything else (a malformed table, a bug) must not end the follower for
                # good and leave routing silently stale.
                logger.exception(
                    "routing table follower failed; reconnecting",
                    extra={"controller": self._address},
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff_s)

    def _apply(self, table: controller_pb2.RoutingTable) -> None:
        self._replicas = tuple(Replica.from_proto(replica) for replica in table.replicas)
        if table.version != self._version:
            self._version = table.version
            logger.info(
                "routing table updated",
                extra={"version": table.version, "ready": sum(r.ready for r in self._replicas)},
            )


class StaticRoutes:
    """A fixed list of engine addresses, each READY while it answers ``GetStats``."""

    def __init__(self, addresses: Sequence[str], *, poll_interval_s: float = 1.0) -> None:
        self._addresses = list(addresses)
        self._poll_interval_s = poll_interval_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._replicas: tuple[Replica, ...] = tuple(
            Replica(replica_id=address, address=address, ready=False) for address in self._addresses
        )
        self._task: asyncio.Task[None] | None = None

    def replicas(self) -> Sequence[Replica]:
        return self._replicas

    async def start(self) -> None:
        self._channels = {address: insecure_channel(address) for address in self._addresses}
        await self._poll_once()
        self._task = asyncio.create_task(self._poll_forever(), name="poll-engines")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for channel in self._channels.values():
            await channel.close()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            await self._poll_once()

    async def _poll_once(self) -> None:
        self._replicas = tuple(
            await asyncio.gather(*(self._probe(address) for address in self._addresses))
        )

    async def _probe(self, address: str) -> Replica:
        stub = engine_pb2_grpc.EngineServiceStub(self._channels[address])
        try:
            stats = await stub.GetStats(
                engine_pb2.GetStatsRequest(), timeout=max(self._poll_interval_s, 1.0)
            )
        except grpc.aio.AioRpcError as exc:
            logger.debug("engine not answering", extra={"engine": address, "code": exc.code().name})
            return Replica(replica_id=address, address=address, ready=False)
        # Keyed by address: the list names engines by address, and ids must stay stable.
        return Replica(
            replica_id=address,
            address=address,
            model=stats.model,
            num_running=stats.load.num_running,
            num_waiting=stats.load.num_waiting,
            kv_usage=stats.load.kv_usage,
            max_model_len=stats.max_model_len,
            max_num_seqs=stats.load.max_num_seqs,
            max_queued_requests=stats.load.max_queued_requests,
            adapters=tuple(a.name for a in stats.lora_adapters if a.resident),
            lora_adapters=tuple((a.name, a.path) for a in stats.lora_adapters),
            lora_fingerprints=tuple((a.name, a.fingerprint) for a in stats.lora_adapters),
            max_loras=stats.max_loras,
            role=stats.role,
            kv_fingerprint=stats.kv_layout.fingerprint,
        )
