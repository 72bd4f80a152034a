"""Failover in the gateway: a replica whose connection failed is left out at once (no waiting
for the controller), and a request that has produced nothing waits for a replica to come
back (a crashed engine's restart, here the real engine service started late on the dead
replica's address) instead of failing."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from engine_service.server import EngineServer
from gateway.engine_client import MAX_ATTEMPTS, EngineClient, EngineError
from gateway.routing import LeastLoadPolicy, Replica, RequestInfo, Router
from switchyard.settings import EngineSettings
from switchyard.v1 import common_pb2, engine_pb2
from tests.gateway.conftest import MAX_MODEL_LEN, MODEL_NAME, BackgroundLoop, serve_gateway


class MutableRoutes:
    """A routing table the test rewrites."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.table = replicas

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def replicas(self) -> Sequence[Replica]:
        return self.table


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def request(request_id: str = "r") -> tuple[engine_pb2.GenerateRequest, RequestInfo]:
    sampling = common_pb2.SamplingParams(max_tokens=3, temperature=0.0)
    return (
        engine_pb2.GenerateRequest(
            request_id=request_id, prompt_token_ids=[5, 6], sampling=sampling
        ),
        RequestInfo(request_id=request_id, model=MODEL_NAME, prompt_token_ids=[5, 6]),
    )


def new_client(
    router: Router, failover_wait_s: float, retries: Counter | None = None
) -> EngineClient:
    retries = retries or Counter("retries", "", registry=CollectorRegistry())
    return EngineClient(router, retries, timeout_s=30, failover_wait_s=failover_wait_s)


def test_an_unreachable_replica_is_left_out_until_its_mark_lapses() -> None:
    clock = Clock()
    routes = MutableRoutes([Replica("engine-0", "a:1"), Replica("engine-1", "b:1")])
    router = Router(routes, LeastLoadPolicy(), unreachable_for_s=2.0, clock=clock)
    router.mark_unreachable(routes.table[0])
    assert [r.replica_id for r in router.ready_replicas()] == ["engine-1"]
    info = RequestInfo(request_id="r", model="m")
    assert all(router.select(info).replica_id == "engine-1" for _ in range(4))
    clock.now += 2.0
    assert len(router.ready_replicas()) == 2


def test_a_replica_that_answers_or_leaves_the_table_loses_its_mark() -> None:
    clock = Clock()
    replica = Replica("engine-0", "a:1")
    routes = MutableRoutes([replica])
    router = Router(routes, LeastLoadPolicy(), unreachable_for_s=60.0, clock=clock)
    router.mark_unreachable(replica)
    assert router.ready_replicas() == []
    router.mark_reachable(replica)
    assert router.ready_replicas() == [replica]

    router.mark_unreachable(replica)
    routes.table = []  # the controller dropped it (it crashed) ...
    assert router.ready_replicas() == []
    routes.table = [replica]  # ... and it registered again after its restart
    assert router.ready_replicas() == [replica]


def test_a_failed_connection_marks_the_replica_and_the_request_goes_elsewhere(
    background: BackgroundLoop, engine: EngineServer
) -> None:
    dead = Replica("engine-dead", f"127.0.0.1:{free_port()}")
    alive = Replica("engine-alive", f"127.0.0.1:{engine.port}")
    routes = MutableRoutes([dead, alive])

    class DeadFirst(LeastLoadPolicy):
        """Tries the dead replica whenever it is a candidate."""

        def select(self, replicas: Sequence[Replica], request_info: RequestInfo) -> Replica:
            return min(replicas, key=lambda r: r.replica_id != dead.replica_id)

    async def scenario() -> None:
        router = Router(routes, DeadFirst(), unreachable_for_s=30.0)
        client = new_client(router, failover_wait_s=0.0)
        try:
            outputs = [r async for r in client.generate(*request())]
            assert outputs and outputs[-1].finished
            assert [r.replica_id for r in router.ready_replicas()] == ["engine-alive"]
        finally:
            await client.close()

    background.run(scenario())


def test_a_request_waits_for_the_replica_to_come_back(
    background: BackgroundLoop, checkpoint: Path
) -> None:
    port = free_port()
    replica = Replica("engine-0", f"127.0.0.1:{port}")
    routes = MutableRoutes([replica])
    settings = EngineSettings(
        model=str(checkpoint),
        served_model_name=MODEL_NAME,
        device="cpu",
        dtype="float32",
        host="127.0.0.1",
        port=port,
        metrics_port=0,
        controller_address="",
        num_kv_blocks=64,
        max_model_len=MAX_MODEL_LEN,
        data_dir=checkpoint.parent,
    )
    restarted = EngineServer(settings)

    async def scenario() -> None:
        router = Router(routes, LeastLoadPolicy(), unreachable_for_s=0.5)
        client = new_client(router, failover_wait_s=60.0)
        try:
            pending = asyncio.create_task(_collect(client))
            await asyncio.sleep(1.0)  # the request has failed once and is waiting
            assert not pending.done()
            await restarted.start()
            outputs = await asyncio.wait_for(pending, timeout=30)
            assert outputs[-1].finished
        finally:
            await client.close()
            await restarted.stop(grace_s=1)

    background.run(scenario())


def test_a_request_that_waited_in_vain_fails_without_internal_addresses(
    background: BackgroundLoop,
) -> None:
    replica = Replica("engine-0", f"127.0.0.1:{free_port()}")

    async def scenario() -> None:
        router = Router(MutableRoutes([replica]), LeastLoadPolicy(), unreachable_for_s=0.2)
        client = new_client(router, failover_wait_s=1.0)
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises(EngineError) as failed:
                await _collect(client)
            assert asyncio.get_running_loop().time() - started < 10
            assert failed.value.code.name == "UNAVAILABLE"
            assert "127.0.0.1" not in failed.value.message
        finally:
            await client.close()

    background.run(scenario())


async def _collect(client: EngineClient) -> list[engine_pb2.GenerateResponse]:
    return [response async for response in client.generate(*request())]


def test_health_says_whether_the_gateway_can_serve_and_live_that_it_answers(
    background: BackgroundLoop, checkpoint: Path
) -> None:
    """The routing table still lists the replica as READY (the controller has not noticed),
    but its connection failed: /health turns 503 at once; /live stays 200."""
    routes = MutableRoutes([Replica("engine-0", f"127.0.0.1:{free_port()}", model=MODEL_NAME)])
    gateway = serve_gateway(background, checkpoint, routes, failover_wait_s=0, request_timeout_s=30)
    try:
        assert httpx.get(f"{gateway.base_url}/health").status_code == 200
        body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2}
        failed = httpx.post(f"{gateway.base_url}/v1/completions", json=body, timeout=30)
        assert failed.status_code == 503
        assert "127.0.0.1" not in failed.text
        health = httpx.get(f"{gateway.base_url}/health")
        assert health.status_code == 503
        assert health.json()["ready_replicas"] == 0
        assert httpx.get(f"{gateway.base_url}/live").status_code == 200
    finally:
        gateway.close()


def test_a_request_is_tried_a_bounded_number_of_times(background: BackgroundLoop) -> None:
    """However long the failover wait, a request that keeps failing (one that brings every
    engine down, say) stops after MAX_ATTEMPTS tries."""
    replica = Replica("engine-0", f"127.0.0.1:{free_port()}")
    registry = CollectorRegistry()
    retries = Counter("retries", "", registry=registry)

    async def scenario() -> None:
        router = Router(MutableRoutes([replica]), LeastLoadPolicy(), unreachable_for_s=0.05)
        client = new_client(router, failover_wait_s=300.0, retries=retries)
        try:
            with pytest.raises(EngineError):
                await asyncio.wait_for(_collect(client), timeout=60)
        finally:
            await client.close()

    background.run(scenario())
    assert registry.get_sample_value("retries_total") == MAX_ATTEMPTS - 1
