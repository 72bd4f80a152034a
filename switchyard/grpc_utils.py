"""gRPC plumbing every service shares: an aio server with the standard health service, client
channels with keepalive, and the mapping from Python exceptions to status codes.

Health: the server registers ``grpc.health.v1.Health``. The overall status (service ``""``)
and each named service start NOT_SERVING; the service calls :meth:`GrpcServer.set_serving`
once it can take requests and :meth:`GrpcServer.stop` flips them back before it drains.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Clients ping idle connections so that a dead peer is noticed within ~40 s; servers accept
# those pings (gRPC's default would answer them with GOAWAY "too_many_pings").
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

_STATUS_BY_EXCEPTION: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (asyncio.CancelledError, grpc.StatusCode.CANCELLED),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
    (PermissionError, grpc.StatusCode.PERMISSION_DENIED),
    (FileNotFoundError, grpc.StatusCode.NOT_FOUND),
    (FileExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ConnectionError, grpc.StatusCode.UNAVAILABLE),
    (MemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (KeyError, grpc.StatusCode.NOT_FOUND),
    (LookupError, grpc.StatusCode.NOT_FOUND),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (TypeError, grpc.StatusCode.INVALID_ARGUMENT),
]


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """The status code a handler answers with when it fails with ``exc``; INTERNAL for
    anything not listed (a bug, not the caller's fault)."""
    for exc_type, code in _STATUS_BY_EXCEPTION:
        if isinstance(exc, exc_type):
            return code
    return grpc.StatusCode.INTERNAL


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """End the RPC with the status code for ``exc`` and its message (raises, never returns)."""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    await context.abort(status_code_for(exc), str(message) or type(exc).__name__)
    raise AssertionError("context.abort returned")  # it raises; this line satisfies NoReturn


class GrpcServer:
    """A ``grpc.aio`` server bound to ``host:port`` with the health service registered.

    Add servicers to :attr:`server` before :meth:`start`. :attr:`port` is the bound port
    (useful when asked for port 0).
    """

    def __init__(self, server: grpc.aio.Server, port: int, service_names: Sequence[str]):
        self.server = server
        self.port = port
        self.health = health.aio.HealthServicer()
        self._service_names = ["", *service_names]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)

    async def start(self) -> None:
        await self.set_serving(False)
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        """Set the overall status and every named service's status at once."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._service_names:
            await self.health.set(name, status)

    async def stop(self, grace_s: float | None) -> None:
        """Report NOT_SERVING, then stop; calls still running after ``grace_s`` are cancelled."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def create_server(host: str, port: int, service_names: Sequence[str] = ()) -> GrpcServer:
    """Create and bind an insecure ``grpc.aio`` server; call from a running event loop.

    ``service_names`` are the full names (``switchyard.v1.EngineService``) whose health the
    server reports beside the overall status. Raises ``RuntimeError`` if the port is taken.
    """
    server = grpc.aio.server(options=SERVER_OPTIONS)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind gRPC server to {host}:{port}")
    return GrpcServer(server, bound, service_names)


def insecure_channel(address: str) -> grpc.aio.Channel:
    """An aio client channel to ``host:port`` with keepalive and 64 MiB message limits."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


async def serve_until_signalled(
    start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]
) -> None:
    """Run ``start``, serve until SIGTERM or SIGINT, then run ``stop``.

    A signal that arrives while ``start`` is still running (an engine loading its weights)
    ends the process at once: nothing has registered or taken traffic yet, and a load running
    in a worker thread cannot be interrupted, so waiting for it would only delay the stop.
    """
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    starting = asyncio.ensure_future(start())
    signalled = asyncio.ensure_future(stop_requested.wait())
    await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        logging.getLogger(__name__).info("stop requested while starting; exiting")
        os._exit(0)
    try:
        starting.result()
        await signalled
    finally:
        signalled.cancel()
        await stop()
