"""Retries before the first token, and errors after it, against real gRPC servers.

The replicas that fail are test doubles: real ``EngineService`` gRPC servers on loopback
whose ``Generate`` fails on purpose (and whose ``GetStats`` answers, so that the gateway
sees them READY). The replica that works is the real engine service.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from engine_service.server import EngineServer
from gateway.route_sources import StaticRoutes
from gateway.routing import Replica, RequestInfo, RoutingPolicy
from switchyard.v1 import engine_pb2, engine_pb2_grpc
from tests.gateway.conftest import MODEL_NAME, BackgroundLoop, ServedApp, serve_gateway


class FailingEngine(engine_pb2_grpc.EngineServiceServicer):
    """Test double: answers GetStats, then fails every Generate with ``code``, optionally
    after sending ``tokens_first`` (one response) so that the failure comes mid-stream."""

    def __init__(self, code: grpc.StatusCode, tokens_first: list[int] | None = None) -> None:
        self.code = code
        self.tokens_first = tokens_first
        self.calls = 0

    async def Generate(
        self, request: engine_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        self.calls += 1
        if self.tokens_first is not None:
            yield engine_pb2.GenerateResponse(index=0, token_ids=self.tokens_first)
        await context.abort(self.code, f"test double fails with {self.code.name}")

    async def GetStats(
        self, request: engine_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.GetStatsResponse:
        return engine_pb2.GetStatsResponse(replica_id="double", model=MODEL_NAME)


class InListOrder(RoutingPolicy):
    """Picks the first candidate, so that the test decides which replica is tried first."""

    def select(self, replicas: Sequence[Replica], request_info: RequestInfo) -> Replica:
        return replicas[0]


async def start_double(servicer: FailingEngine) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    engine_pb2_grpc.add_EngineServiceServicer_to_server(servicer, server)
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def double_factory(background: BackgroundLoop) -> Iterator[list[tuple[grpc.aio.Server, str]]]:
    servers: list[tuple[grpc.aio.Server, str]] = []
    yield servers
    for server, _ in servers:
        background.run(server.stop(None))


def gateway_with(
    background: BackgroundLoop,
    checkpoint: Path,
    servers: list[tuple[grpc.aio.Server, str]],
    doubles: list[FailingEngine],
    extra: list[str],
    **overrides: Any,
) -> ServedApp:
    addresses = []
    for double in doubles:
        server, address = background.run(start_double(double))
        servers.append((server, address))
        addresses.append(address)
    return serve_gateway(
        background,
        checkpoint,
        StaticRoutes([*addresses, *extra]),
        policy=InListOrder(),
        **overrides,
    )


def chat(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def test_unavailable_replica_is_skipped_before_the_first_token(
    background: BackgroundLoop,
    checkpoint: Path,
    engine: EngineServer,
    double_factory: list[tuple[grpc.aio.Server, str]],
) -> None:
    double = FailingEngine(grpc.StatusCode.UNAVAILABLE)
    gateway = gateway_with(
        background, checkpoint, double_factory, [double], [f"127.0.0.1:{engine.port}"]
    )
    try:
        completion = chat(gateway.base_url).completions.create(
            model=MODEL_NAME, prompt="Hello", max_tokens=3
        )
        assert completion.choices[0].finish_reason in ("length", "stop")
        assert double.calls == 1
        assert (
            "switchyard_gateway_engine_retries_total 1.0"
            in httpx.get(f"{gateway.base_url}/metrics").text
        )
    finally:
        gateway.close()


def test_all_replicas_unavailable_is_503_with_retry_after_and_no_address(
    background: BackgroundLoop, checkpoint: Path, double_factory: list[tuple[grpc.aio.Server, str]]
) -> None:
    # The second replica listens nowhere: gRPC's own error then names its address.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_address = f"127.0.0.1:{probe.getsockname()[1]}"
    double = FailingEngine(grpc.StatusCode.UNAVAILABLE)
    gateway = gateway_with(
        background, checkpoint, double_factory, [double], [closed_address], failover_wait_s=0
    )
    try:
        response = httpx.post(
            f"{gateway.base_url}/v1/completions",
            json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 3},
            timeout=30,
        )
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) >= 1
        error = response.json()["error"]
        assert error["code"] == "engine_unavailable"
        assert "127.0.0.1" not in response.text and "connect" not in response.text
        assert double.calls == 1
    finally:
        gateway.close()


def test_replicas_with_full_queues_give_429_with_retry_after(
    background: BackgroundLoop, checkpoint: Path, double_factory: list[tuple[grpc.aio.Server, str]]
) -> None:
    doubles = [
        FailingEngine(grpc.StatusCode.RESOURCE_EXHAUSTED),
        FailingEngine(grpc.StatusCode.UNAVAILABLE),
    ]
    gateway = gateway_with(background, checkpoint, double_factory, doubles, [], failover_wait_s=0)
    try:
        with pytest.raises(openai.RateLimitError) as failure:
            chat(gateway.base_url).completions.create(
                model=MODEL_NAME, prompt="Hello", max_tokens=3
            )
        assert failure.value.status_code == 429
        assert int(failure.value.response.headers["retry-after"]) >= 1
        assert failure.value.body["code"] == "engine_overloaded"  # type: ignore[index]
        assert [double.calls for double in doubles] == [1, 1]
        metrics = httpx.get(f"{gateway.base_url}/metrics").text
        assert 'switchyard_gateway_rejected_requests_total{code="engine_overloaded"} 1.0' in metrics
    finally:
        gateway.close()


def test_engine_invalid_argument_is_400_and_not_retried(
    background: BackgroundLoop,
    checkpoint: Path,
    engine: EngineServer,
    double_factory: list[tuple[grpc.aio.Server, str]],
) -> None:
    double = FailingEngine(grpc.StatusCode.INVALID_ARGUMENT)
    gateway = gateway_with(
        background, checkpoint, double_factory, [double], [f"127.0.0.1:{engine.port}"]
    )
    try:
        with pytest.raises(openai.BadRequestError) as failure:
            chat(gateway.base_url).completions.create(
                model=MODEL_NAME, prompt="Hello", max_tokens=3
            )
        assert failure.value.status_code == 400
        assert double.calls == 1
    finally:
        gateway.close()


def test_failure_after_the_first_token_ends_the_stream_with_an_error(
    background: BackgroundLoop,
    checkpoint: Path,
    engine: EngineServer,
    double_factory: list[tuple[grpc.aio.Server, str]],
) -> None:
    double = FailingEngine(grpc.StatusCode.UNAVAILABLE, tokens_first=[300, 301])
    gateway = gateway_with(
        background, checkpoint, double_factory, [double], [f"127.0.0.1:{engine.port}"]
    )
    try:
        body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 5, "stream": True}
        with httpx.stream(
            "POST", f"{gateway.base_url}/v1/completions", json=body, timeout=30
        ) as response:
            assert response.status_code == 200
            payloads = [line.removeprefix("data: ") for line in response.iter_lines() if line]
        assert payloads[-1] == "[DONE]"
        error = json.loads(payloads[-2])["error"]
        assert (
            error["code"] == "engine_unavailable" and error["type"] == "service_unavailable_error"
        )
        assert double.calls == 1  # not retried once output had been sent
    finally:
        gateway.close()


def test_engine_invalid_argument_is_400_in_anthropic_format_before_any_event(
    background: BackgroundLoop,
    checkpoint: Path,
    double_factory: list[tuple[grpc.aio.Server, str]],
) -> None:
    """What the engine's grammar backend refuses reaches an Anthropic client as a 400, not
    as a stream that breaks off."""
    double = FailingEngine(grpc.StatusCode.INVALID_ARGUMENT)
    gateway = gateway_with(background, checkpoint, double_factory, [double], [])
    try:
        body = {
            "model": MODEL_NAME,
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "Hello"}],
            "stream": True,
        }
        response = httpx.post(f"{gateway.base_url}/v1/messages", json=body, timeout=30)
        assert response.status_code == 400
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()
        assert error["type"] == "error"
        assert error["error"]["type"] == "invalid_request_error"
        assert "test double fails with INVALID_ARGUMENT" in error["error"]["message"]
    finally:
        gateway.close()


def test_an_unavailable_fleet_is_503_once_the_failover_wait_is_over(
    background: BackgroundLoop, checkpoint: Path, double_factory: list[tuple[grpc.aio.Server, str]]
) -> None:
    """The request waits ``failover_wait_s`` for a replica to come back, trying again as the
    unreachable mark lapses, then fails: late, but never hanging."""
    double = FailingEngine(grpc.StatusCode.UNAVAILABLE)
    gateway = gateway_with(background, checkpoint, double_factory, [double], [], failover_wait_s=3)
    try:
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as failure:
            chat(gateway.base_url).completions.create(
                model=MODEL_NAME, prompt="Hello", max_tokens=3
            )
        waited = time.monotonic() - started
        assert failure.value.status_code == 503
        assert 3 <= waited < 20
        assert 2 <= double.calls <= 4  # once, then again each time the 2 s mark lapsed
    finally:
        gateway.close()
