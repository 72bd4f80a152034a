"""Flooding the one replica: a burst far over capacity gets only complete 200s and 429s (or
503s) with Retry-After, nothing hangs, and a request right after the burst succeeds."""

from __future__ import annotations

import asyncio

import httpx

from tests.chaos.checks import HEADERS, assert_idle, complete
from tests.e2e.stack import MODEL_NAME, Stack

BURST = 32  # the engine runs 1 and queues 4
MAX_TOKENS = 6


def test_a_burst_over_capacity_is_served_or_refused_cleanly(chaos_stack: Stack) -> None:
    url = f"{chaos_stack.url}/v1/completions"

    async def one(client: httpx.AsyncClient, i: int, stream: bool) -> tuple[int, str, str | None]:
        body = {
            "model": MODEL_NAME,
            "prompt": f"request {i}",
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
            "stream": stream,
        }
        if not stream:
            response = await client.post(url, json=body)
            return response.status_code, response.text, response.headers.get("retry-after")
        async with client.stream("POST", url, json=body) as response:
            text = "".join([line async for line in response.aiter_lines()])
            return response.status_code, text, response.headers.get("retry-after")

    async def burst() -> list[tuple[int, str, str | None]]:
        async with httpx.AsyncClient(headers=HEADERS, timeout=120) as client:
            return await asyncio.gather(*(one(client, i, i % 2 == 1) for i in range(BURST)))

    results = asyncio.run(burst())

    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 429, 503}, statuses
    assert statuses.count(200) >= 1
    assert statuses.count(429) + statuses.count(503) >= 1
    for status, text, retry_after in results:
        if status != 200:
            assert retry_after is not None and float(retry_after) > 0
            assert '"error"' in text
            assert "127.0.0.1:" not in text  # no internal address reaches clients
        elif text.startswith("data:"):
            assert text.rstrip().endswith("data: [DONE]")
            assert '"finish_reason":"length"' in text.replace(" ", "")
        else:
            assert f'"completion_tokens":{MAX_TOKENS}' in text.replace(" ", "")
    after = complete(chaos_stack)
    assert after.status_code == 200, after.text
    assert_idle(chaos_stack)
