"""Clients that go away mid-stream: the running request and the waiting one are aborted in
the engine, their KV blocks come back, and the gateway counts nothing in flight."""

from __future__ import annotations

import asyncio

import httpx

from tests.chaos.checks import HEADERS, assert_idle, complete
from tests.e2e.stack import MODEL_NAME, Stack, engine_stats, ready_replicas, wait_until


def test_disconnected_streams_free_their_work(chaos_stack: Stack) -> None:
    [address] = ready_replicas(chaos_stack).values()
    body = {"model": MODEL_NAME, "max_tokens": 2000, "stream": True, "ignore_eos": True}
    url = f"{chaos_stack.url}/v1/completions"

    async def scenario() -> None:
        generating = asyncio.Event()

        async def read(client: httpx.AsyncClient, prompt: str) -> None:
            async with client.stream("POST", url, json={**body, "prompt": prompt}) as response:
                async for line in response.aiter_lines():
                    if '"text"' in line:
                        generating.set()

        async with httpx.AsyncClient(headers=HEADERS, timeout=60) as client:
            running = asyncio.create_task(read(client, "one"))
            await asyncio.wait_for(generating.wait(), 30)
            waiting = asyncio.create_task(read(client, "two"))
            # max-num-seqs 1: the second waits behind the first.
            await asyncio.to_thread(
                wait_until, lambda: engine_stats(address).load.num_waiting == 1, 10, "a wait"
            )
            assert engine_stats(address).load.num_running == 1
            for task in (running, waiting):  # the clients hang up
                task.cancel()
            await asyncio.gather(running, waiting, return_exceptions=True)

    asyncio.run(scenario())
    assert_idle(chaos_stack, timeout_s=10)
    reply = complete(chaos_stack)
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["finish_reason"] == "length"
