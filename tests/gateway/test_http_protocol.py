"""The gateway's HTTP protocol writes a response's head together with its first body, and
never holds a head longer than one turn of the event loop (``gateway/http_protocol.py``)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from gateway.http_protocol import (
    ON_DISCONNECT,
    DisconnectCallbacks,
    GatewayHttpProtocol,
    HeadCoalescingTransport,
)
from tests.support import BackgroundLoop

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"


class RecordingTransport:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def write(self, data: bytes) -> None:
        self.calls.append(("write", bytes(data)))

    def writelines(self, chunks: list[bytes]) -> None:
        self.calls.append(("writelines", list(chunks)))

    def close(self) -> None:
        self.calls.append(("close", None))

    def abort(self) -> None:
        self.calls.append(("abort", None))

    def get_write_buffer_size(self) -> int:
        return 0

    closing = False

    def is_closing(self) -> bool:
        return self.closing


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def turn(loop: asyncio.AbstractEventLoop) -> None:
    loop.run_until_complete(asyncio.sleep(0))


def test_a_head_goes_out_with_the_next_write(loop: asyncio.AbstractEventLoop) -> None:
    inner = RecordingTransport()
    transport = HeadCoalescingTransport(inner, loop)  # type: ignore[arg-type]
    transport.write(HEAD)
    assert inner.calls == []
    assert transport.get_write_buffer_size() == len(HEAD)
    transport.write(b"5\r\nhello\r\n")
    transport.write(b"0\r\n\r\n")
    assert inner.calls == [("write", HEAD + b"5\r\nhello\r\n"), ("write", b"0\r\n\r\n")]
    turn(loop)  # the cancelled flush writes nothing more
    assert len(inner.calls) == 2


def test_a_head_alone_goes_out_at_the_next_turn(loop: asyncio.AbstractEventLoop) -> None:
    inner = RecordingTransport()
    transport = HeadCoalescingTransport(inner, loop)  # type: ignore[arg-type]
    transport.write(HEAD)
    turn(loop)
    assert inner.calls == [("write", HEAD)]
    transport.write(b"body")
    assert inner.calls[-1] == ("write", b"body")


def test_other_writes_pass_through_and_close_flushes(loop: asyncio.AbstractEventLoop) -> None:
    inner = RecordingTransport()
    transport = HeadCoalescingTransport(inner, loop)  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 but not a head")
    transport.write(HEAD)
    transport.writelines([b"a", b"b"])
    transport.write(HEAD)
    transport.close()
    assert inner.calls == [
        ("write", b"HTTP/1.1 but not a head"),
        ("write", HEAD),
        ("writelines", [b"a", b"b"]),
        ("write", HEAD),
        ("close", None),
    ]
    assert transport.is_closing() is False  # the rest is the transport's own


def test_a_head_held_when_the_client_left_is_dropped(loop: asyncio.AbstractEventLoop) -> None:
    inner = RecordingTransport()
    transport = HeadCoalescingTransport(inner, loop)  # type: ignore[arg-type]
    transport.write(HEAD)
    inner.closing = True  # the connection was lost before the loop's next turn
    turn(loop)
    assert inner.calls == []


def test_abort_drops_a_held_head(loop: asyncio.AbstractEventLoop) -> None:
    inner = RecordingTransport()
    transport = HeadCoalescingTransport(inner, loop)  # type: ignore[arg-type]
    transport.write(HEAD)
    transport.abort()
    turn(loop)
    assert inner.calls == [("abort", None)]


# What the disconnect callbacks of ``/wait`` and ``/done`` saw, by path.
DISCONNECTS: dict[str, asyncio.Event] = {}


async def stream_app(scope: Scope, receive: Receive, send: Send) -> None:
    """``/together``: headers and a first event at once, the rest later; ``/apart``: headers,
    then the body only after a pause; ``/wait``: nothing until the client leaves (told by a
    disconnect callback); ``/done``: a whole response, its callback left registered."""
    if scope["type"] != "http":
        return
    if scope["path"] in ("/wait", "/done"):
        callbacks = scope[ON_DISCONNECT]  # type: ignore[typeddict-item]
        assert isinstance(callbacks, DisconnectCallbacks)
        gone = DISCONNECTS[scope["path"]] = asyncio.Event()
        callbacks.add(gone.set)
        if scope["path"] == "/wait":
            await asyncio.wait_for(gone.wait(), timeout=5)
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done", "more_body": False})
        return
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    if scope["path"] == "/apart":
        await asyncio.sleep(0.5)
    await send({"type": "http.response.body", "body": b"data: first\n\n", "more_body": True})
    await asyncio.sleep(0.2)
    await send({"type": "http.response.body", "body": b"data: last\n\n", "more_body": False})


class _RecordingSocketSide:
    """The real transport, with what is written to it recorded."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


WRITES: list[bytes] = []


class RecordingProtocol(GatewayHttpProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_RecordingSocketSide(transport, WRITES))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server_port() -> Iterator[int]:
    background = BackgroundLoop()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        stream_app, host="127.0.0.1", port=port, http=RecordingProtocol, log_level="warning"
    )
    server = uvicorn.Server(config)

    async def start() -> asyncio.Task[None]:
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        return task

    task = background.run(start())
    yield port

    async def stop() -> None:
        server.should_exit = True
        await task

    background.run(stop())
    background.close()


def first_read(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nhost: test\r\n\r\n".encode())
        return sock.recv(65536)


def test_the_head_and_the_first_event_are_one_write(server_port: int) -> None:
    WRITES.clear()
    received = first_read(server_port, "/together")
    assert received.startswith(b"HTTP/1.1 200")
    head, _, body = WRITES[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"d\r\ndata: first\n\n\r\n"  # chunked: the first event, whole


def test_a_head_without_a_body_is_not_held_back(server_port: int) -> None:
    received = first_read(server_port, "/apart")  # the body follows 0.5 s later
    assert received.startswith(b"HTTP/1.1 200") and received.endswith(b"\r\n\r\n")


def test_a_client_that_leaves_is_told_by_its_disconnect_callback(server_port: int) -> None:
    with socket.create_connection(("127.0.0.1", server_port), timeout=5) as sock:
        sock.sendall(b"GET /wait HTTP/1.1\r\nhost: test\r\n\r\n")
        deadline = time.monotonic() + 5
        while "/wait" not in DISCONNECTS and time.monotonic() < deadline:
            time.sleep(0.01)
    deadline = time.monotonic() + 5
    while not DISCONNECTS["/wait"].is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert DISCONNECTS["/wait"].is_set()


def test_a_connection_closed_after_a_whole_response_is_no_disconnect(server_port: int) -> None:
    received = first_read(server_port, "/done")  # the client closes once it has the answer
    assert received.endswith(b"done\r\n0\r\n\r\n")
    time.sleep(0.2)
    assert not DISCONNECTS["/done"].is_set()


def test_a_failing_disconnect_callback_does_not_keep_the_others_from_running() -> None:
    callbacks, ran = DisconnectCallbacks(), []

    def failing() -> None:
        raise RuntimeError("boom")

    callbacks.add(failing)
    callbacks.add(lambda: ran.append(True))
    callbacks.fire()
    assert ran == [True] and callbacks.gone
