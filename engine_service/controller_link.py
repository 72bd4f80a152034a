"""The replica's link to the controller: registration and heartbeats carrying its load."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from switchyard.grpc_utils import insecure_channel
from switchyard.v1 import common_pb2, controller_pb2, controller_pb2_grpc

logger = logging.getLogger(__name__)

CONTROLLER_RPC_TIMEOUT_S = 5.0


class ControllerLink:
    """Keeps this replica registered: Register, then Heartbeat every interval with the
    current load; registers again when the controller answers ``known=false`` (it
    restarted) and retries quietly while it is unreachable. The engine serves regardless."""

    def __init__(
        self,
        address: str,
        replica: Callable[[], common_pb2.Replica],
        interval_s: float,
    ) -> None:
        self._address = address
        self._replica = replica
        self._interval_s = interval_s
        self._channel = insecure_channel(address)
        self._stub = controller_pb2_grpc.ControllerServiceStub(self._channel)
        self._registered = False

    async def run(self) -> None:
        reachable = True
        while True:
            try:
                await self._beat()
                if not reachable:
                    logger.info("controller %s reachable again", self._address)
                reachable = True
            except grpc.aio.AioRpcError as exc:
                if reachable:
                    logger.warning(
                        "controller %s unreachable (%s); retrying every %.1fs",
                        self._address,
                        exc.code().name,
                        self._interval_s,
                    )
                reachable = False
            await asyncio.sleep(self._interval_s)

    async def _beat(self) -> None:
        replica = self._replica()
        if self._registered:
            answer = await self._stub.Heartbeat(
                controller_pb2.HeartbeatRequest(
                    replica_id=replica.replica_id,
                    load=replica.load,
                    lora_adapters=replica.lora_adapters,
                ),
                timeout=CONTROLLER_RPC_TIMEOUT_S,
            )
            if answer.known:
                return
            logger.info("controller does not know this replica; registering again")
            self._registered = False
        registered = await self._stub.Register(
            controller_pb2.RegisterRequest(replica=replica), timeout=CONTROLLER_RPC_TIMEOUT_S
        )
        self._registered = True
        if registered.heartbeat_interval_s > 0:
            self._interval_s = registered.heartbeat_interval_s
        logger.info("registered with controller %s as %s", self._address, replica.replica_id)

    async def deregister(self, replica_id: str) -> None:
        """Leave the routing table at once; a controller that is down learns it from the
        missing heartbeats instead."""
        try:
            if self._registered:
                await self._stub.Deregister(
                    controller_pb2.DeregisterRequest(replica_id=replica_id),
                    timeout=CONTROLLER_RPC_TIMEOUT_S,
                )
                logger.info("deregistered from controller %s", self._address)
        except grpc.aio.AioRpcError as exc:
            logger.warning("deregister failed: %s", exc.code().name)
        finally:
            self._registered = False
            await self._channel.close()
