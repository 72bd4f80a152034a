"""A client that goes away while the gateway waits on the engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.errors import ApiError
from gateway.http_protocol import ON_DISCONNECT, DisconnectCallbacks
from gateway.serving import until_disconnected


class GoneClient:
    """Stands in for a Starlette request whose client has disconnected, served by a server
    that offers no disconnect callbacks (the gateway then watches ``receive``)."""

    def __init__(self) -> None:
        self.scope: dict[str, Any] = {}

    async def receive(self) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}


def test_a_disconnect_unwinds_the_pending_generation_so_it_can_be_closed():
    closed = []

    async def deltas() -> AsyncIterator[int]:
        try:
            await asyncio.sleep(3600)
            yield 1
        finally:
            closed.append(True)

    async def scenario() -> None:
        generation = deltas()
        with pytest.raises(ApiError) as caught:
            await until_disconnected(GoneClient(), anext(generation))  # type: ignore[arg-type]
        assert caught.value.status == 499
        await generation.aclose()  # the handlers close it; it must not be "already running"
        assert closed == [True]

    asyncio.run(scenario())


class CallbackClient:
    """A request served by the gateway's own HTTP protocol: its disconnect is a callback."""

    def __init__(self) -> None:
        self.callbacks = DisconnectCallbacks()
        self.scope = {ON_DISCONNECT: self.callbacks}

    async def receive(self) -> dict[str, Any]:
        raise AssertionError("with disconnect callbacks nothing reads receive")


def test_a_disconnect_callback_unwinds_the_pending_generation_so_it_can_be_closed():
    closed = []

    async def deltas() -> AsyncIterator[int]:
        try:
            await asyncio.sleep(3600)
            yield 1
        finally:
            closed.append(True)

    async def scenario() -> None:
        client = CallbackClient()
        generation = deltas()
        asyncio.get_running_loop().call_later(0.01, client.callbacks.fire)
        with pytest.raises(ApiError) as caught:
            await until_disconnected(client, anext(generation))  # type: ignore[arg-type]
        assert caught.value.status == 499
        await generation.aclose()
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
