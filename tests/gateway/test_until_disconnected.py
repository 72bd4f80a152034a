"""``until_disconnected``: the awaited work finishes unless the client leaves first, and the
work meant for the wait runs while it waits, without a failure of its own mattering."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from gateway.errors import ApiError
from gateway.serving import until_disconnected


class FakeRequest:
    """``receive`` answers ``http.disconnect`` once ``leave`` is set."""

    def __init__(self) -> None:
        self.leave = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.leave.wait()
        return {"type": "http.disconnect"}


def test_the_work_for_the_wait_runs_while_the_awaitable_waits() -> None:
    async def scenario() -> list[str]:
        events: list[str] = []

        async def engine() -> str:
            events.append("call started")
            await asyncio.sleep(0.05)
            events.append("answered")
            return "first"

        request = cast(Any, FakeRequest())
        result = await until_disconnected(request, engine(), lambda: events.append("prepared"))
        assert result == "first"
        return events

    assert asyncio.run(scenario()) == ["call started", "prepared", "answered"]


def test_a_failing_preparation_is_ignored() -> None:
    def fail() -> None:
        raise ValueError("raised again where the answer is built")

    async def scenario() -> str:
        async def engine() -> str:
            await asyncio.sleep(0.02)
            return "first"

        return await until_disconnected(cast(Any, FakeRequest()), engine(), fail)

    assert asyncio.run(scenario()) == "first"


def test_a_client_that_leaves_cancels_the_wait_with_499() -> None:
    async def scenario() -> tuple[bool, int]:
        request = FakeRequest()
        cancelled = False

        async def engine() -> None:
            nonlocal cancelled
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled = True
                raise

        asyncio.get_running_loop().call_later(0.05, request.leave.set)
        with pytest.raises(ApiError) as caught:
            await until_disconnected(cast(Any, request), engine())
        return cancelled, caught.value.status

    assert asyncio.run(scenario()) == (True, 499)


def test_an_awaitable_that_never_waits_starts_no_watcher() -> None:
    async def scenario() -> tuple[str, int]:
        async def immediate() -> str:
            return "done"

        before = len(asyncio.all_tasks())
        result = await until_disconnected(cast(Any, FakeRequest()), immediate())
        await asyncio.sleep(0)
        return result, len(asyncio.all_tasks()) - before

    assert asyncio.run(scenario()) == ("done", 0)
