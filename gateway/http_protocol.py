"""uvicorn's HTTP protocol (httptools): a response's head and first body in one write, and
a request's disconnect told to whoever waits on it without a task per request.

uvicorn writes the status line and headers to the socket as soon as the app sends
``http.response.start``, and the body in a write of its own: two system calls, two segments
on the wire, and a client that wakes for headers alone before it wakes again for the first
event of a stream. :class:`GatewayHttpProtocol` holds a response's head until the next write
on the connection, which the gateway's responses make at once (the first events of a stream
are framed before the headers go out, ``gateway/sse.py``), and sends both together. A head
with nothing after it is written at the event loop's next turn, so a response that sends
its headers and then waits still gets them out; the bytes and their order never change.

An ASGI app learns that its client went away by reading ``http.disconnect`` from
``receive``, which takes a task that waits on it for as long as the answer runs: the gateway
started one while it waited for the first token and another for the stream, each a task to
create, run and cancel per request. The protocol knows first (``connection_lost``), so it
offers each request a :class:`DisconnectCallbacks` in the scope (:data:`ON_DISCONNECT`):
callbacks registered there run when the connection is lost before the response is complete,
the moment uvicorn marks the request disconnected (``gateway/serving.py``, ``gateway/sse.py``;
served by another server, the scope has none and they watch ``receive`` as before).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)

_HEAD_START = b"HTTP/1.1 "
_HEAD_END = b"\r\n\r\n"

# The scope key of a request's DisconnectCallbacks (only under GatewayHttpProtocol).
ON_DISCONNECT = "switchyard.on_disconnect"


class DisconnectCallbacks:
    """What runs, on the event loop, when one request's client goes away before its response
    is complete. A callback added after that runs at the loop's next turn (as a watcher task
    reading ``receive`` would find out), so that the task adding it is never cancelled while
    it runs: callbacks cancel the request's task, and a cancel requested by a running task
    of itself lands on whatever it awaits next."""

    __slots__ = ("_callbacks", "gone")

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], object]] = []
        self.gone = False

    def add(self, callback: Callable[[], object]) -> None:
        if self.gone:
            asyncio.get_running_loop().call_soon(callback)
        else:
            self._callbacks.append(callback)

    def remove(self, callback: Callable[[], object]) -> None:
        if callback in self._callbacks:
            self._callbacks.remove(callback)

    def fire(self) -> None:
        self.gone = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one callback's failure must not keep the others from running
                logger.exception("a disconnect callback failed")


class HeadCoalescingTransport:
    """A transport that holds a written response head (``HTTP/1.1 ...`` through the blank
    line) until the next write, or the loop's next turn, whichever is first; every other
    call goes to ``transport`` (held bytes first, where they must)."""

    __slots__ = ("_flush_handle", "_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._flush_handle: asyncio.Handle | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._release()
            self._transport.write(held + data)
        elif data.startswith(_HEAD_START) and data.endswith(_HEAD_END):
            self._held = bytes(data)
            self._flush_handle = self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Writes the held head, if any, now (not to a connection already gone: the client
        left in between, and uvloop refuses writes to a closed transport)."""
        held = self._held
        if held is not None:
            self._release()
            if not self._transport.is_closing():
                self._transport.write(held)

    def _release(self) -> None:
        self._held = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    def writelines(self, chunks: Any) -> None:
        self.flush()
        self._transport.writelines(chunks)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._release()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a :class:`HeadCoalescingTransport`, each request's
    scope carrying its :class:`DisconnectCallbacks`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(HeadCoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        # Not for an upgrade, which made no cycle of this request (its scope is another).
        if cycle is not None and cycle.scope is self.scope:
            self.scope[ON_DISCONNECT] = DisconnectCallbacks()  # type: ignore[typeddict-unknown-key]

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and cycle.disconnected:  # lost before the response completed
            callbacks = cycle.scope.get(ON_DISCONNECT)
            if isinstance(callbacks, DisconnectCallbacks):
                callbacks.fire()
