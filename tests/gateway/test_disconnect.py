"""A client that goes away while the gateway waits on the engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.errors import ApiError
from gateway.serving import until_disconnected


class GoneClient:
    """Stands in for a Starlette request whose client has disconnected."""

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
