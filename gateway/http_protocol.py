"""uvicorn's HTTP protocol (httptools), with a response's head and first body in one write.

uvicorn writes the status line and headers to the socket as soon as the app sends
``http.response.start``, and the body in a write of its own: two system calls, two segments
on the wire, and a client that wakes for headers alone before it wakes again for the first
event of a stream. :class:`GatewayHttpProtocol` holds a response's head until the next write
on the connection, which the gateway's responses make at once (the first events of a stream
are framed before the headers go out, ``gateway/sse.py``), and sends both together. A head
with nothing after it is written at the event loop's next turn, so a response that sends
its headers and then waits still gets them out; the bytes and their order never change.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_HEAD_START = b"HTTP/1.1 "
_HEAD_END = b"\r\n\r\n"


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
    """uvicorn's httptools protocol on a :class:`HeadCoalescingTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(HeadCoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
