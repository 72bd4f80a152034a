"""Following the controller's routing table through drops of the WatchRoutes stream.

The controller here is a test double: a real ``ControllerService`` gRPC server on loopback
whose ``WatchRoutes`` sends a scripted table per connection and then ends the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from gateway.route_sources import ControllerRoutes
from switchyard.v1 import common_pb2, controller_pb2, controller_pb2_grpc


def table(version: int, *states: int) -> controller_pb2.RoutingTable:
    return controller_pb2.RoutingTable(
        version=version,
        replicas=[
            common_pb2.Replica(replica_id=f"e{i}", address=f"127.0.0.1:{6000 + i}", state=state)
            for i, state in enumerate(states)
        ],
    )


class ScriptedController(controller_pb2_grpc.ControllerServiceServicer):
    """Test double: connection k gets ``tables[k]`` and then the stream ends (a drop)."""

    def __init__(self, tables: list[controller_pb2.RoutingTable]) -> None:
        self.tables = tables
        self.connections = 0
        self.gateway_ids: list[str] = []

    async def WatchRoutes(
        self, request: controller_pb2.WatchRoutesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[controller_pb2.RoutingTable]:
        self.gateway_ids.append(request.gateway_id)
        index = self.connections
        self.connections += 1
        if index < len(self.tables):
            yield self.tables[index]
        else:
            await asyncio.sleep(3600)  # stays connected; the last table stands


async def wait_for(condition: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_routes_follow_the_controller_and_survive_stream_drops() -> None:
    async def scenario() -> None:
        READY, DRAINING = common_pb2.REPLICA_STATE_READY, common_pb2.REPLICA_STATE_DRAINING
        controller = ScriptedController([table(1, READY), table(2, READY, DRAINING)])
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(controller, server)
        await server.start()
        routes = ControllerRoutes(
            f"127.0.0.1:{port}", "gw-1", initial_backoff_s=0.05, max_backoff_s=0.1
        )
        await routes.start()
        try:
            await wait_for(lambda: controller.connections >= 2 and len(routes.replicas()) == 2)
            replicas = routes.replicas()
            assert [(r.replica_id, r.ready) for r in replicas] == [("e0", True), ("e1", False)]
            await wait_for(lambda: controller.connections >= 3)
            assert len(routes.replicas()) == 2  # the last table is kept while reconnecting
            assert set(controller.gateway_ids) == {"gw-1"}
        finally:
            await routes.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_routes_keep_the_last_table_while_the_controller_is_down() -> None:
    async def scenario() -> None:
        controller = ScriptedController([table(1, common_pb2.REPLICA_STATE_READY)])
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(controller, server)
        await server.start()
        routes = ControllerRoutes(
            f"127.0.0.1:{port}", "gw-1", initial_backoff_s=0.05, max_backoff_s=0.1
        )
        await routes.start()
        try:
            await wait_for(lambda: len(routes.replicas()) == 1)
            await server.stop(None)
            await asyncio.sleep(0.3)  # several failed reconnects
            assert [r.replica_id for r in routes.replicas()] == ["e0"]
        finally:
            await routes.close()

    asyncio.run(scenario())


def test_routes_keep_following_after_an_unexpected_error() -> None:
    async def scenario() -> None:
        READY = common_pb2.REPLICA_STATE_READY
        controller = ScriptedController([table(1, READY), table(2, READY, READY)])
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(controller, server)
        await server.start()
        routes = ControllerRoutes(
            f"127.0.0.1:{port}", "gw-1", initial_backoff_s=0.05, max_backoff_s=0.1
        )
        real_apply = routes._apply
        failures = [RuntimeError("malformed table")]

        def apply_failing_once(update: controller_pb2.RoutingTable) -> None:
            if failures:
                raise failures.pop()
            real_apply(update)

        routes._apply = apply_failing_once  # type: ignore[method-assign]
        await routes.start()
        try:
            await wait_for(lambda: len(routes.replicas()) == 2)
        finally:
            await routes.close()
            await server.stop(None)

    asyncio.run(scenario())
