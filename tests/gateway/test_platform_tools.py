"""The platform's tools through the gateway: ``/mcp`` with the official ``mcp`` client (both
protocol eras), and ``/v1/responses`` with the official ``openai`` client, running the
server-side tool loop on the real engine and the real tool service, which is connected to
an external MCP server written with the ``mcp`` SDK (``tests/tool_service/weather_mcp_server.py``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import mcp_types
import openai
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from engine_service.server import EngineServer
from gateway.route_sources import StaticRoutes
from switchyard.settings import ToolServiceSettings
from tests.gateway.conftest import MODEL_NAME, BackgroundLoop, ServedApp, serve_gateway
from tests.tool_service.conftest import WEATHER_STDIO, start_weather_http
from tool_service.server import ToolServer

KEY = "sk-tools-test"
WEATHER = {"type": "mcp", "server_label": "weather", "require_approval": "never"}
FORCE_FORECAST = {"type": "mcp", "server_label": "weather", "name": "forecast"}
# Enough for a forced call (the grammar's fixed text counts too) and a short answer.
GREEDY: dict[str, Any] = {"temperature": 0, "max_output_tokens": 120}


@pytest.fixture(scope="module")
def tool_server(
    background: BackgroundLoop, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ToolServer]:
    docs = tmp_path_factory.mktemp("docs")
    (docs / "notes.md").write_text("switchyard serves models\n")
    settings = ToolServiceSettings(
        host="127.0.0.1",
        port=0,
        mcp_servers=[f"weather={WEATHER_STDIO}"],
        file_search_roots=[docs],
    )
    server = ToolServer(settings)
    background.run(server.start())
    yield server
    background.run(server.stop(0.5))


@pytest.fixture(scope="module")
def gateway(
    background: BackgroundLoop, checkpoint: Path, engine: EngineServer, tool_server: ToolServer
) -> Iterator[ServedApp]:
    served = serve_gateway(
        background,
        checkpoint,
        StaticRoutes([f"127.0.0.1:{engine.port}"]),
        api_keys=[KEY],
        tool_service_address=f"127.0.0.1:{tool_server.port}",
    )
    yield served
    served.close()


@pytest.fixture(scope="module")
def client(gateway: ServedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=KEY, max_retries=0)


def mcp_session(gateway: ServedApp, key: str | None, mode: str) -> Client:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    transport = streamable_http_client(
        f"{gateway.base_url}/mcp", http_client=create_mcp_http_client(headers=headers)
    )
    return Client(transport, mode=mode, cache=None)


async def list_and_call(gateway: ServedApp, mode: str) -> tuple[list[str], Any, Any, str]:
    async with mcp_session(gateway, KEY, mode) as session:
        listed = await session.list_tools()
        python = await session.call_tool("python", {"code": "print(2 ** 10)"})
        forecast = await session.call_tool("weather__forecast", {"city": "Lima"})
        version = session.session.protocol_version
    return sorted(tool.name for tool in listed.tools), python, forecast, version


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
def test_mcp_clients_list_and_call_the_platform_tools(gateway: ServedApp, mode: str) -> None:
    names, python, forecast, version = asyncio.run(list_and_call(gateway, mode))
    assert names == [
        "file_search",
        "python",
        "weather__explode",
        "weather__forecast",
        "weather__slow",
    ]
    assert version == ("2025-11-25" if mode == "legacy" else "2026-07-28")
    assert not python.is_error
    assert [block.text for block in python.content] == ["1024"]
    # the external server's tool, run through the gateway and the tool service
    assert isinstance(forecast.content[0], mcp_types.TextContent)
    assert forecast.content[0].text == "forecast for Lima: 4 degrees and sunny"


def test_mcp_progress_reaches_the_client(gateway: ServedApp) -> None:
    """Progress the external server reports travels tool service -> gateway -> MCP client."""
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        seen.append((done, total, message))

    async def scenario() -> Any:
        async with mcp_session(gateway, KEY, "legacy") as session:
            return await session.call_tool(
                "weather__slow", {"seconds": 0.2}, progress_callback=on_progress
            )

    result = asyncio.run(scenario())
    assert result.content[0].text == "done"
    assert seen == [(step, 4, f"step {step}") for step in range(4)]


def test_mcp_legacy_sessions_carry_a_session_id(gateway: ServedApp) -> None:
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"},
        },
    }
    reply = httpx.post(
        f"{gateway.base_url}/mcp",
        json=initialize,
        headers={
            "Authorization": f"Bearer {KEY}",
            "Accept": "application/json, text/event-stream",
        },
        timeout=10,
    )
    assert reply.status_code == 200
    assert reply.headers["mcp-session-id"]


def test_mcp_refuses_a_client_without_a_key(gateway: ServedApp) -> None:
    reply = httpx.post(
        f"{gateway.base_url}/mcp",
        json={"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {}},
        headers={"Accept": "application/json, text/event-stream"},
        timeout=10,
    )
    assert reply.status_code == 401
    assert reply.headers["www-authenticate"] == "Bearer"

    async def connect() -> None:
        async with mcp_session(gateway, None, "auto") as session:
            await session.list_tools()

    with pytest.raises(Exception):  # noqa: B017 - the SDK raises its own transport error
        asyncio.run(connect())


def forecast_output(items: list[Any]) -> tuple[Any, dict[str, Any]]:
    call = next(item for item in items if item.type == "mcp_call")
    return call, json.loads(call.arguments)


def test_a_forced_mcp_tool_runs_and_the_model_answers(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL_NAME,
        input="What is the weather like?",
        tools=[WEATHER],
        tool_choice=FORCE_FORECAST,
        **GREEDY,
    )
    kinds = [item.type for item in response.output]
    assert kinds[:2] == ["mcp_list_tools", "mcp_call"]
    assert kinds[-1] == "message"
    listing = response.output[0]
    assert {tool.name for tool in listing.tools} == {"forecast", "slow", "explode"}
    call, arguments = forecast_output(response.output)
    assert call.server_label == "weather" and call.name == "forecast"
    assert call.error is None
    city = arguments["city"]
    assert call.output == f"forecast for {city}: {len(city)} degrees and sunny"
    assert response.output_text  # the final message
    metrics = httpx.get(f"{client.base_url}".removesuffix("/v1/") + "/metrics").text
    assert 'switchyard_gateway_tool_calls_total{outcome="completed",server_label="weather"}' in (
        metrics
    )
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0


def test_streaming_gives_the_same_items(client: openai.OpenAI) -> None:
    request: dict[str, Any] = dict(
        model=MODEL_NAME,
        input="What is the weather like?",
        tools=[WEATHER],
        tool_choice=FORCE_FORECAST,
        **GREEDY,
    )
    whole = client.responses.create(**request)
    events = list(client.responses.create(**request, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    for expected in (
        "response.mcp_list_tools.completed",
        "response.mcp_call.completed",
        "response.output_text.delta",
        "response.output_text.done",
    ):
        assert expected in kinds
    final = events[-1].response
    strip = {"id", "approval_request_id"}

    def shape(items: list[Any]) -> list[dict[str, Any]]:
        return [{k: v for k, v in item.model_dump().items() if k not in strip} for item in items]

    assert shape(final.output) == shape(whole.output)
    done_items = [event.item for event in events if event.type == "response.output_item.done"]
    assert shape(done_items) == shape(final.output)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text


def test_a_function_tool_comes_back_to_the_client_and_the_conversation_continues(
    client: openai.OpenAI,
) -> None:
    lookup = {
        "type": "function",
        "name": "lookup_order",
        "description": "Finds an order",
        "parameters": {
            "type": "object",
            "properties": {"order": {"type": "string", "maxLength": 6}},
            "required": ["order"],
            "additionalProperties": False,
        },
    }
    first = client.responses.create(
        model=MODEL_NAME,
        input="Where is my order?",
        tools=[lookup],
        tool_choice={"type": "function", "name": "lookup_order"},
        **GREEDY,
    )
    assert first.status == "completed"
    assert [item.type for item in first.output] == ["function_call"]
    call = first.output[0]
    assert call.name == "lookup_order"
    assert set(json.loads(call.arguments)) == {"order"}
    second = client.responses.create(
        model=MODEL_NAME,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "shipped"}],
        tools=[lookup],
        tool_choice="none",
        **GREEDY,
    )
    assert second.previous_response_id == first.id
    assert [item.type for item in second.output] == ["message"]
    # The continued conversation is the prompt: longer than the first request's.
    assert second.usage.input_tokens > first.usage.input_tokens
    assert client.responses.retrieve(second.id).id == second.id
    # OpenAI's easy input: role and content, no type.
    third = client.responses.create(
        model=MODEL_NAME,
        previous_response_id=second.id,
        input=[{"role": "user", "content": "Thanks!"}],
        max_output_tokens=4,
    )
    assert third.usage is not None and third.usage.input_tokens > second.usage.input_tokens


def test_approval_requests_wait_for_the_client(client: openai.OpenAI) -> None:
    asking = {**WEATHER, "require_approval": "always"}
    first = client.responses.create(
        model=MODEL_NAME,
        input="Weather?",
        tools=[asking],
        tool_choice=FORCE_FORECAST,
        **GREEDY,
    )
    request = first.output[-1]
    assert request.type == "mcp_approval_request"
    assert request.name == "forecast"
    second = client.responses.create(
        model=MODEL_NAME,
        previous_response_id=first.id,
        input=[
            {"type": "mcp_approval_response", "approval_request_id": request.id, "approve": True}
        ],
        tools=[asking],
        **GREEDY,
    )
    call = second.output[0]
    assert call.type == "mcp_call"
    city = json.loads(request.arguments)["city"]
    assert call.output == f"forecast for {city}: {len(city)} degrees and sunny"


def test_text_format_constrains_the_answer(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"mood": {"enum": ["calm", "stormy"]}},
        "required": ["mood"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model=MODEL_NAME,
        input="How is the sea?",
        text={"format": {"type": "json_schema", "name": "sea", "schema": schema}},
        max_output_tokens=40,
    )
    assert json.loads(response.output_text)["mood"] in ("calm", "stormy")


@pytest.mark.parametrize(
    ("fields", "status", "param"),
    [
        ({"tools": [{"type": "mcp", "server_label": "nowhere"}]}, 400, "tools[0]"),
        (
            {"tools": [{"type": "mcp", "server_label": "x", "server_url": "http://127.0.0.1:9"}]},
            403,
            "tools[0].server_url",
        ),
        ({"tool_choice": {"type": "mcp", "server_label": "weather"}}, 400, "tool_choice"),
        ({"previous_response_id": "resp_missing"}, 404, "previous_response_id"),
        ({"input": []}, 400, "input"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            400,
            "input[0].content",
        ),
    ],
)
def test_bad_requests_get_openai_errors(
    gateway: ServedApp, fields: dict[str, Any], status: int, param: str
) -> None:
    body = {"model": MODEL_NAME, "input": "hi", **fields}
    reply = httpx.post(
        f"{gateway.base_url}/v1/responses",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param


def test_chat_completions_run_platform_tools(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice=FORCE_FORECAST,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=120,
    )
    message = completion.choices[0].message
    calls = (message.model_extra or {})["mcp_calls"]
    assert [(call["server_label"], call["name"]) for call in calls] == [("weather", "forecast")]
    city = json.loads(calls[0]["arguments"])["city"]
    assert calls[0]["output"] == f"forecast for {city}: {len(city)} degrees and sunny"
    assert message.content
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None and completion.usage.prompt_tokens > 0

    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": "Weather?"}],
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice=FORCE_FORECAST,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=120,
            stream=True,
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == message.content  # greedy: the same answer, streamed
    assert chunks[-1].choices[0].finish_reason == completion.choices[0].finish_reason


def test_anthropic_mcp_servers_run_platform_tools(gateway: ServedApp) -> None:
    claude = anthropic.Anthropic(base_url=gateway.base_url, api_key=KEY, max_retries=0)
    servers = [
        {
            "type": "url",
            "name": "weather",
            "url": "http://unused.invalid/mcp",  # a configured label: its own server is used
            "tool_configuration": {"allowed_tools": ["forecast"]},
        }
    ]
    message = claude.beta.messages.create(
        model=MODEL_NAME,
        max_tokens=120,
        extra_body={"temperature": 0},  # greedy (this SDK's beta call takes no temperature)
        messages=[{"role": "user", "content": "Weather?"}],
        mcp_servers=servers,  # type: ignore[arg-type]
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        betas=["mcp-client-2025-04-04"],
    )
    kinds = [block.type for block in message.content]
    assert kinds[:2] == ["mcp_tool_use", "mcp_tool_result"]
    use, result = message.content[0], message.content[1]
    assert (use.server_name, use.name) == ("weather", "forecast")  # type: ignore[union-attr]
    city = use.input["city"]  # type: ignore[union-attr,index]
    assert result.content[0].text == f"forecast for {city}: {len(city)} degrees and sunny"  # type: ignore[union-attr,index]
    assert not result.is_error  # type: ignore[union-attr]
    assert message.stop_reason in ("end_turn", "max_tokens")

    with claude.beta.messages.stream(
        model=MODEL_NAME,
        max_tokens=120,
        extra_body={"temperature": 0},  # greedy (this SDK's beta call takes no temperature)
        messages=[{"role": "user", "content": "Weather?"}],
        mcp_servers=servers,  # type: ignore[arg-type]
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        betas=["mcp-client-2025-04-04"],
    ) as stream:
        final = stream.get_final_message()
    assert [block.type for block in final.content] == kinds


def test_platform_tools_in_chat_name_configured_servers_only(gateway: ServedApp) -> None:
    reply = httpx.post(
        f"{gateway.base_url}/v1/chat/completions",
        json={
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "mcp", "server_label": "nowhere"}],
        },
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert reply.status_code == 400
    assert "nowhere" in reply.json()["error"]["message"]


@pytest.fixture(scope="module")
def outbound_gateway(
    background: BackgroundLoop, checkpoint: Path, engine: EngineServer
) -> Iterator[ServedApp]:
    """A gateway and tool service that both allow MCP servers named by URL."""
    server = ToolServer(ToolServiceSettings(host="127.0.0.1", port=0, allow_outbound_mcp=True))
    background.run(server.start())
    served = serve_gateway(
        background,
        checkpoint,
        StaticRoutes([f"127.0.0.1:{engine.port}"]),
        tool_service_address=f"127.0.0.1:{server.port}",
        allow_outbound_mcp=True,
    )
    yield served
    served.close()
    background.run(server.stop(0.5))


@pytest.fixture(scope="module")
def weather_http() -> Iterator[str]:
    url, process = start_weather_http()
    yield url
    process.terminate()
    process.wait(timeout=10)


def test_server_url_reaches_a_server_when_outbound_mcp_is_allowed(
    outbound_gateway: ServedApp, weather_http: str
) -> None:
    client = openai.OpenAI(base_url=f"{outbound_gateway.base_url}/v1", api_key="-", max_retries=0)
    remote = {"type": "mcp", "server_label": "remote", "server_url": weather_http}
    # Unset, require_approval asks for servers named by URL.
    asked = client.responses.create(
        model=MODEL_NAME,
        input="Weather?",
        tools=[{**remote, "allowed_tools": ["forecast"]}],
        tool_choice={"type": "mcp", "server_label": "remote", "name": "forecast"},
        **GREEDY,
    )
    assert [item.type for item in asked.output] == ["mcp_list_tools", "mcp_approval_request"]
    ran = client.responses.create(
        model=MODEL_NAME,
        input="Weather?",
        tools=[{**remote, "require_approval": "never"}],
        tool_choice={"type": "mcp", "server_label": "remote", "name": "forecast"},
        **GREEDY,
    )
    call, arguments = forecast_output(ran.output)
    assert call.server_label == "remote"
    city = arguments["city"]
    assert call.output == f"forecast for {city}: {len(city)} degrees and sunny"
