"""The tool service and MCP through ``switchyard up``: the official ``mcp`` client lists and
calls the platform's tools at ``/mcp`` with a key (and is refused without one), an external
MCP server given with ``--mcp-server`` appears under its label, and the ``openai`` client's
Responses API runs a forced MCP tool server-side."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tests.e2e.stack import (
    API_KEY,
    MODEL_NAME,
    REPO_ROOT,
    Stack,
    marked_pids,
    start_stack,
    stop_stack,
)

WEATHER_SERVER = REPO_ROOT / "tests" / "tool_service" / "weather_mcp_server.py"


@pytest.fixture(scope="module")
def tool_stack(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = start_stack(
        checkpoint,
        tmp_path_factory.mktemp("tool-stack"),
        engines=1,
        extra_args=["--mcp-server", f"weather={sys.executable} {WEATHER_SERVER}"],
    )
    yield started
    stop_stack(started)


def session(stack: Stack, key: str | None) -> Client:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    transport = streamable_http_client(
        f"{stack.url}/mcp", http_client=create_mcp_http_client(headers=headers)
    )
    return Client(transport, cache=None)


def test_mcp_client_lists_and_calls_builtin_and_external_tools(tool_stack: Stack) -> None:
    async def scenario():  # type: ignore[no-untyped-def]
        async with session(tool_stack, API_KEY) as client:
            listed = await client.list_tools()
            python = await client.call_tool("python", {"code": "print(sum(range(101)))"})
            forecast = await client.call_tool("weather__forecast", {"city": "Kyiv"})
        return {tool.name for tool in listed.tools}, python, forecast

    names, python, forecast = asyncio.run(scenario())
    assert {"python", "weather__forecast", "weather__slow"} <= names
    assert python.content[0].text == "5050"
    assert forecast.content[0].text == "forecast for Kyiv: 4 degrees and sunny"


def test_mcp_is_refused_without_a_key(tool_stack: Stack) -> None:
    reply = httpx.post(
        f"{tool_stack.url}/mcp",
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}},
        headers={"Accept": "application/json, text/event-stream"},
        timeout=10,
    )
    assert reply.status_code == 401

    async def scenario() -> None:
        async with session(tool_stack, "sk-wrong") as client:
            await client.list_tools()

    with pytest.raises(Exception):  # noqa: B017 - the SDK raises its own transport error
        asyncio.run(scenario())


def test_responses_run_a_forced_mcp_tool(tool_stack: Stack) -> None:
    client = openai.OpenAI(base_url=tool_stack.base_url, api_key=API_KEY, max_retries=0)
    response = client.responses.create(
        model=MODEL_NAME,
        input="Weather in the capital?",
        tools=[{"type": "mcp", "server_label": "weather", "require_approval": "never"}],
        tool_choice={"type": "mcp", "server_label": "weather", "name": "forecast"},
        temperature=0,
        max_output_tokens=120,
    )
    call = next(item for item in response.output if item.type == "mcp_call")
    city = json.loads(call.arguments)["city"]
    assert call.output == f"forecast for {city}: {len(city)} degrees and sunny"
    assert response.output[-1].type == "message"


def test_a_killed_tool_service_is_restarted_and_serves_again(tool_stack: Stack) -> None:
    victims = [
        pid
        for pid in marked_pids(tool_stack.mark)
        if b"tool_service" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    ]
    assert len(victims) == 1
    os.kill(victims[0], signal.SIGKILL)

    async def forecast() -> str:
        async with session(tool_stack, API_KEY) as client:
            result = await client.call_tool("weather__forecast", {"city": "Riga"})
        return str(result.content[0].text)

    deadline = time.monotonic() + 60
    while True:  # `up` restarts it on the same address; its MCP server comes back with it
        try:
            assert asyncio.run(forecast()) == "forecast for Riga: 4 degrees and sunny"
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
