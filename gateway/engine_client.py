"""Running a request on an engine replica over gRPC, with retries before the first token.

One channel per replica address, reused by every request; a channel whose replica left the
routing table is closed once no request uses it. A request that fails on a
replica before any response arrives (the replica is down, refuses, or is out of room) is
retried on another replica; once a response has arrived, the client has seen output and a
failure ends the request with an error instead. Leaving the iteration early, for any reason
(a stop string, a client that went away), cancels the call, which aborts the request on the
engine and frees its KV blocks.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from prometheus_client import Counter

from gateway.routing import NoReplicaAvailable, RequestInfo, Router
from switchyard.grpc_utils import insecure_channel
from switchyard.v1 import engine_pb2, engine_pb2_grpc

logger = logging.getLogger(__name__)

# Failures that say "not here, not now" rather than "this request is wrong".
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


class EngineError(Exception):
    """An engine ended a request with a gRPC error (after retries, where they applied)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class EngineClient:
    """Streams ``Generate`` calls to replicas the router selects."""

    def __init__(self, router: Router, retries: Counter, *, timeout_s: float | None = None) -> None:
        self._router = router
        self._retries = retries
        self._timeout_s = timeout_s
        self._stubs: dict[str, engine_pb2_grpc.EngineServiceStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._calls_by_address: dict[str, int] = {}

    def channel_addresses(self) -> set[str]:
        """The replica addresses this client holds an open channel to."""
        return set(self._channels)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()

    def _stub(self, address: str) -> engine_pb2_grpc.EngineServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = insecure_channel(address)
            self._channels[address] = channel
            stub = self._stubs[address] = engine_pb2_grpc.EngineServiceStub(channel)
        return stub

    async def _close_departed(self) -> None:
        """Closes the idle channels of replicas that are no longer in the routing table, so
        that a fleet that churns through replicas does not leave sockets behind."""
        listed = {replica.address for replica in self._router.source.replicas()}
        departed = [
            address
            for address in self._channels
            if address not in listed and not self._calls_by_address.get(address)
        ]
        for address in departed:
            channel = self._channels.pop(address)
            del self._stubs[address]
            await channel.close()

    async def generate(
        self, request: engine_pb2.GenerateRequest, request_info: RequestInfo
    ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        """Yields the engine's responses; raises ``EngineError`` or ``NoReplicaAvailable``.

        Close the iterator (``contextlib.aclosing``) to cancel the call early.
        """
        await self._close_departed()
        tried: set[str] = set()
        last_error: grpc.aio.AioRpcError | None = None
        while True:
            try:
                replica = self._router.select(request_info, exclude=frozenset(tried))
            except NoReplicaAvailable:
                if last_error is None:
                    raise
                raise EngineError(
                    last_error.code(), last_error.details() or "engine unavailable"
                ) from None
            tried.add(replica.replica_id)
            started = False
            address = replica.address
            call = self._stub(address).Generate(request, timeout=self._timeout_s)
            self._calls_by_address[address] = self._calls_by_address.get(address, 0) + 1
            with self._router.track(replica):
                try:
                    async for response in call:
                        started = True
                        yield response
                    return
                except grpc.aio.AioRpcError as exc:
                    if started or exc.code() not in _RETRYABLE:
                        raise EngineError(exc.code(), exc.details() or "") from None
                    last_error = exc
                    self._retries.inc()
                    logger.warning(
                        "engine failed before the first token; retrying on another replica",
                        extra={"replica": replica.replica_id, "code": exc.code().name},
                    )
                finally:
                    call.cancel()
                    remaining = self._calls_by_address[address] - 1
                    if remaining:
                        self._calls_by_address[address] = remaining
                    else:
                        del self._calls_by_address[address]
