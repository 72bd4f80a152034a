"""The engine client's channels: one per replica in the routing table, none for those gone."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry, Counter

from gateway.engine_client import EngineClient, EngineError
from gateway.routing import LeastLoadPolicy, Replica, RequestInfo, Router
from switchyard.v1 import engine_pb2


class MutableRoutes:
    """A routing table the test rewrites."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.table = replicas

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def replicas(self) -> Sequence[Replica]:
        return self.table


def dead_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def test_channels_to_replicas_that_left_the_table_are_closed():
    async def scenario() -> None:
        first, second = dead_address(), dead_address()
        routes = MutableRoutes([Replica(replica_id="engine-0", address=first)])
        retries = Counter("retries", "", registry=CollectorRegistry())
        client = EngineClient(Router(routes, LeastLoadPolicy()), retries, timeout_s=5)
        request = engine_pb2.GenerateRequest(request_id="r", prompt_token_ids=[1])
        info = RequestInfo(request_id="r", model="m", prompt_token_ids=[1])
        try:
            with pytest.raises(EngineError):
                async for _ in client.generate(request, info):
                    pass
            assert client.channel_addresses() == {first}
            routes.table = [Replica(replica_id="engine-1", address=second)]
            with pytest.raises(EngineError):
                async for _ in client.generate(request, info):
                    pass
            assert client.channel_addresses() == {second}
        finally:
            await client.close()

    asyncio.run(scenario())
