"""A lean ASGI response for server-sent events.

Starlette's ``StreamingResponse`` runs the body and a disconnect listener in an anyio task
group on every request; this one runs the body in the request's own task and cancels it when
the client goes away (closing the iterator, which cancels the engine call and frees the
request's KV blocks): told by the gateway's HTTP protocol
(:class:`~gateway.http_protocol.DisconnectCallbacks`), or, served by another server, seen by
one plain asyncio task reading ``receive``. It is what every streamed answer of the gateway
goes out through, so its cost is paid per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.http_protocol import ON_DISCONNECT, DisconnectCallbacks


class FinalEvents(bytes):
    """A stream's last events: :class:`EventStream` writes them together with the end of the
    body (one write, not two; uvicorn writes the chunked body's terminator with the message
    that ends it). The iterator yields nothing after them; whatever it still runs (a log line,
    a metric) runs once the client has the whole answer."""


class EventStream(Response):
    """Sends ``events`` (each an already framed ``bytes`` of one or more events; the last may
    be :class:`FinalEvents`) as a ``text/event-stream`` response with ``headers``."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> None:
        # Response's own __init__ renders a body; a stream has none, so only its fields are set.
        self.events = events
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            *((name.lower().encode(), value.encode()) for name, value in (headers or {}).items()),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone = ended = finished = False

        def client_gone() -> None:
            nonlocal gone
            # After the body's end, ``receive`` says "disconnect" too: nobody left.
            if not ended and not finished:
                gone = True
                task.cancel()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            client_gone()

        callbacks = scope.get(ON_DISCONNECT)
        if not isinstance(callbacks, DisconnectCallbacks):
            callbacks = None
        # The first events are framed before the headers go out: the handlers build this
        # response once the first delta is in, so the first text follows the headers at once
        # instead of after a write and a task start.
        watcher: asyncio.Task[None] | None = None
        try:
            first = await anext(self.events, b"")
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            ended = isinstance(first, FinalEvents)
            if first or ended:
                await send({"type": "http.response.body", "body": first, "more_body": not ended})
            if callbacks is not None:
                callbacks.add(client_gone)
            else:
                watcher = asyncio.create_task(watch())
            async for chunk in self.events:
                ended = isinstance(chunk, FinalEvents)
                await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
            if not ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()  # the client left: nothing more to send, and nothing failed
        finally:
            finished = True
            if callbacks is not None:
                callbacks.remove(client_gone)
            if watcher is not None:
                watcher.cancel()
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()
