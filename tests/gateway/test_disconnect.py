"""A client that goes away while the gateway waits on the engine."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from gateway.errors import ApiError
from gateway.http_protocol import ON_DISCONNECT, DisconnectCallbacks
from gateway.route_sources import StaticRoutes
from gateway.serving import until_disconnected
from switchyard.v1 import engine_pb2, engine_pb2_grpc
from tests.gateway.conftest import MODEL_NAME, BackgroundLoop, serve_gateway


class GoneClient:
    """Stands in for a Starlette request whose client has disconnected, served by a server
    that offers no disconnect callbacks (the gateway then watches ``receive``)."""

    def __init__(self) -> None:
        self.scope: dict[str, Any] = {}

    async def receive(self) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}


class CallbackClient:
    """A request served by the gateway's own HTTP protocol: its disconnect is a callback."""

    def __init__(self) -> None:
        self.callbacks = DisconnectCallbacks()
        self.scope = {ON_DISCONNECT: self.callbacks}

    async def receive(self) -> dict[str, Any]:
        raise AssertionError("with disconnect callbacks nothing reads receive")


@pytest.mark.parametrize("told_by", ["receive", "callback"])
def test_a_disconnect_unwinds_the_pending_generation_so_it_can_be_closed(told_by):
    """Seen by a watcher reading ``receive`` (another server) or told by the gateway's HTTP
    protocol as a callback: either way the wait ends in a 499 and the generation can close."""
    closed = []

    async def deltas() -> AsyncIterator[int]:
        try:
            await asyncio.sleep(3600)
            yield 1
        finally:
            closed.append(True)

    async def scenario() -> None:
        client: GoneClient | CallbackClient = GoneClient()
        if told_by == "callback":
            client = CallbackClient()
            asyncio.get_running_loop().call_later(0.01, client.callbacks.fire)
        generation = deltas()
        with pytest.raises(ApiError) as caught:
            await until_disconnected(client, anext(generation))  # type: ignore[arg-type]
        assert caught.value.status == 499
        await generation.aclose()  # the handlers close it; it must not be "already running"
        assert closed == [True]

    asyncio.run(scenario())


def test_a_client_gone_before_the_wait_starts_is_a_499_too():
    async def deltas() -> AsyncIterator[int]:
        await asyncio.sleep(3600)
        yield 1

    async def scenario() -> None:
        client = CallbackClient()
        client.callbacks.fire()
        generation = deltas()
        with pytest.raises(ApiError) as caught:
            await until_disconnected(client, anext(generation))  # type: ignore[arg-type]
        assert caught.value.status == 499
        await generation.aclose()

    asyncio.run(scenario())


def test_a_wait_that_ends_first_leaves_nothing_behind_on_the_callbacks():
    async def scenario() -> None:
        client = CallbackClient()
        assert await until_disconnected(client, asyncio.sleep(0, "done")) == "done"  # type: ignore[arg-type]
        client.callbacks.fire()  # the client leaves later: nothing is cancelled
        await asyncio.sleep(0.01)

    asyncio.run(scenario())


class StallingEngine(engine_pb2_grpc.EngineServiceServicer):
    """Test double: a replica that takes every request and never answers it, noting when
    the gateway cancels the call."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def Generate(
        self, request: engine_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        self.started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        yield engine_pb2.GenerateResponse()

    async def GetStats(
        self, request: engine_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.GetStatsResponse:
        return engine_pb2.GetStatsResponse(replica_id="stalling", model=MODEL_NAME)


def test_a_client_gone_before_the_first_token_cancels_the_engine_call_and_counts_499(
    background: BackgroundLoop, checkpoint: Path
) -> None:
    """Served by the gateway's own protocol, the connection's loss is a callback: the wait
    for the first token ends, the engine call is cancelled, and the request counts as 499."""
    double = StallingEngine()

    async def start() -> tuple[grpc.aio.Server, str]:
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        engine_pb2_grpc.add_EngineServiceServicer_to_server(double, server)
        await server.start()
        return server, f"127.0.0.1:{port}"

    server, address = background.run(start())
    gateway = serve_gateway(background, checkpoint, StaticRoutes([address]))
    try:
        deadline = time.monotonic() + 10
        while httpx.get(f"{gateway.base_url}/health").status_code != 200:
            assert time.monotonic() < deadline, "the double never became routable"
            time.sleep(0.05)
        body = json.dumps(
            {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 4, "stream": True}
        ).encode()
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nhost: test\r\n"
                b"content-type: application/json\r\ncontent-length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            background.run(asyncio.wait_for(double.started.wait(), timeout=10))
        background.run(asyncio.wait_for(double.cancelled.wait(), timeout=10))
        deadline = time.monotonic() + 10
        counted = 'switchyard_gateway_requests_total{endpoint="/v1/completions",status="499"}'
        while counted not in httpx.get(f"{gateway.base_url}/metrics").text:
            assert time.monotonic() < deadline, "the gateway did not count the request as 499"
            time.sleep(0.05)
    finally:
        gateway.close()
        background.run(server.stop(None))
