"""A lean ASGI response for server-sent events.

Starlette's ``StreamingResponse`` runs the body and a disconnect listener in an anyio task
group on every request; this one runs the body in the request's own task and watches for the
client going away with one plain asyncio task, which cancels the body when it does (closing
the iterator, which cancels the engine call and frees the request's KV blocks). It is what
every streamed answer of the gateway goes out through, so its cost is paid per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class EventStream(Response):
    """Sends ``events`` (each an already framed ``bytes`` of one or more events) as a
    ``text/event-stream`` response with ``headers``."""

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
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            task.cancel()

        # The first events are framed before the headers go out: the handlers build this
        # response once the first delta is in, so the first text follows the headers at once
        # instead of after a write and a task start.
        watcher: asyncio.Task[None] | None = None
        try:
            first = await anext(self.events, b"")
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            if first:
                await send({"type": "http.response.body", "body": first, "more_body": True})
            watcher = asyncio.create_task(watch())
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()  # the client left: nothing more to send, and nothing failed
        finally:
            if watcher is not None:
                watcher.cancel()
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()
