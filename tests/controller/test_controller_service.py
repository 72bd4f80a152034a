"""ControllerService over real gRPC in-process: registration, heartbeats, the WatchRoutes
stream, listing and scaling."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.plan import RestartPolicy
from controller.reconciler import Reconciler
from controller.registry import ReplicaRegistry
from controller.server import SERVICE_NAME, ControllerServicer, RouteFeed
from switchyard.grpc_utils import create_server, insecure_channel
from switchyard.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from tests.controller.fakes import FakeBackend, FakeClock

Stub = controller_pb2_grpc.ControllerServiceStub


def run_with_controller(
    body: Callable[[Stub, grpc.aio.Channel], Awaitable[None]], with_backend: bool = True
) -> None:
    """Serves a controller on a free port (backend fake or none) and runs ``body``."""

    async def main() -> None:
        clock = FakeClock()
        feed = RouteFeed()
        registry = ReplicaRegistry(6.0, 30.0, clock=clock, on_change=feed.notify)
        reconciler = (
            Reconciler(registry, FakeBackend(clock), 1, RestartPolicy(), clock=clock)
            if with_backend
            else None
        )
        server = create_server("127.0.0.1", 0, [SERVICE_NAME])
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(
            ControllerServicer(registry, feed, reconciler, heartbeat_interval_s=0.5),
            server.server,
        )
        await server.start()
        await server.set_serving(True)
        channel = insecure_channel(f"127.0.0.1:{server.port}")
        try:
            await asyncio.wait_for(body(Stub(channel), channel), timeout=20)
        finally:
            await channel.close()
            await server.stop(grace_s=None)

    asyncio.run(main())


def replica(replica_id: str, port: int) -> common_pb2.Replica:
    return common_pb2.Replica(replica_id=replica_id, address=f"127.0.0.1:{port}")


async def register(stub: Stub, replica_id: str, port: int) -> None:
    await stub.Register(controller_pb2.RegisterRequest(replica=replica(replica_id, port)))


def table_ids(table: controller_pb2.RoutingTable) -> list[str]:
    return [r.replica_id for r in table.replicas]


def test_health_reports_serving() -> None:
    async def body(stub: Stub, channel: grpc.aio.Channel) -> None:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

    run_with_controller(body)


def test_register_answers_the_heartbeat_interval() -> None:
    async def body(stub: Stub, channel: grpc.aio.Channel) -> None:
        reply = await stub.Register(controller_pb2.RegisterRequest(replica=replica("e-0", 1)))
        assert reply.heartbeat_interval_s == 0.5

    run_with_controller(body)


def test_register_without_address_is_invalid() -> None:
    async def body(stub: Stub, channel: grpc.aio.Channel) -> None:
        request = controller_pb2.RegisterRequest(replica=common_pb2.Replica(replica_id="e-0"))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Register(request)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    run_with_controller(body)


def test_heartbeat_tells_an_unknown_replica_to_register() -> None:
    async def body(stub: Stub, channel: grpc.aio.Channel) -> None:
        beat = controller_pb2.HeartbeatRequest(replica_id="e-0")
        assert (await stub.Heartbeat(beat)).known is False
        await register(stub, "e-0", 1)
        assert (await stub.Heartbeat(beat)).known is True
        await stub.Deregister(controller_pb2.DeregisterRequest(replica_id="e-0"))
        assert (await stub.Heartbeat(beat)).known is False

    run_with_controller(body)


def test_watch_routes_sends_the_table_first_then_every_change() -> None:
    async def body(stub: Stub, channel: grpc.aio.Channel) -> None:
        await register(stub, "e-0", 1)
        stream: AsyncIterator[controller_pb2.RoutingTable] = stub.WatchRoutes(
            controller_pb2.WatchRoutesRequest(gateway_id="g")
        ).__aiter__()
        first = await anext(stream)
        assert table_ids(first) == ["e-0"]

        await register(stub, "e-1", 2)
        second = await anext(stream)
        assert table_ids(second) == ["e-0", "e-1"]
        assert second.version > first.version

        load = common_pb2.ReplicaLoad(num_running=4, kv_usage=0.5)
        await stub.Heartbeat(controller_pb2.HeartbeatRequest(replica_id="e-1", load=load))
        third = await anext(stream)
        assert third.version > second.version
        assert third.replicas[1].load.num_running == 4

        await stub.Deregister(controller_pb2.DeregisterRequest(replica_id="e-0"))
        fourth = await anext(stream)
        assert table_ids(fourth) == ["e-1"]
        assert fourth.version > third.version

    run_with_controller(body)


def test_every_watcher_gets_the_changes() -> None:
    async def body(stub: Stub, channel: grpc.aio.Channel) -> None:
        request = controller_pb2.WatchRoutesRequest()
        streams = [stub.WatchRoutes(request).__aiter__() for _ in range(3)]
        for stream in streams:
            assert table_ids(await anext(stream)) == []
        await register(stub, "e-0", 1)
        for stream in streams:
            assert table_ids(await anext(stream)) == ["e-0"]

    run_with_controller(body)


def test_scale_sets_the_desired_size() -> None:
    async def body(stub: Stub, channel: grpc.aio.Channel) -> None:
        reply = await stub.Scale(controller_pb2.ScaleRequest(pool="engines", replicas=3))
        assert (reply.previous, reply.desired) == (1, 3)
        listed = await stub.ListReplicas(controller_pb2.ListReplicasRequest())
        assert dict(listed.desired) == {"engines": 3}

    run_with_controller(body)


def test_scale_of_an_unknown_pool_is_invalid() -> None:
    async def body(stub: Stub, channel: grpc.aio.Channel) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Scale(controller_pb2.ScaleRequest(pool="gpus", replicas=3))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    run_with_controller(body)


def test_scale_without_a_backend_is_refused() -> None:
    async def body(stub: Stub, channel: grpc.aio.Channel) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Scale(controller_pb2.ScaleRequest(pool="engines", replicas=2))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    run_with_controller(body, with_backend=False)


def test_list_replicas_shows_every_state() -> None:
    async def body(stub: Stub, channel: grpc.aio.Channel) -> None:
        await register(stub, "e-0", 1)
        listed = await stub.ListReplicas(controller_pb2.ListReplicasRequest())
        assert [(r.replica_id, r.state) for r in listed.replicas] == [
            ("e-0", common_pb2.REPLICA_STATE_READY)
        ]

    run_with_controller(body, with_backend=False)


def test_a_fresh_controller_holds_its_first_table_until_engines_had_time_to_register() -> None:
    """After a controller restart its registry is empty until the engines that kept serving
    beat again; gateways must not get that empty table, which would stop all traffic."""

    async def main() -> None:
        feed = RouteFeed(settle_s=0.5)
        registry = ReplicaRegistry(6.0, 30.0, on_change=feed.notify)
        follower = feed.follow(registry)
        first = asyncio.ensure_future(anext(follower))
        await asyncio.sleep(0.2)
        assert not first.done()
        registry.register(replica("engine-0", 50100))  # its first heartbeat to the new one
        table = await asyncio.wait_for(first, timeout=5)
        assert [r.replica_id for r in table.replicas] == ["engine-0"]
        await follower.aclose()

    asyncio.run(main())
