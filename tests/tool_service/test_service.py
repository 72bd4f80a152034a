"""The ToolService over gRPC, as the gateway uses it: listing, calling built-in and MCP tools,
progress, and every way a call can go wrong ending as an error result or a status code."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from switchyard.v1 import tool_pb2, tool_pb2_grpc
from tests.tool_service.conftest import WEATHER_STDIO, StartTools


def stub(server) -> tool_pb2_grpc.ToolServiceStub:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    return tool_pb2_grpc.ToolServiceStub(channel)


def call(server, name: str, arguments: dict | str, **fields) -> list[tool_pb2.CallToolEvent]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    request = tool_pb2.CallToolRequest(name=name, arguments_json=text, **fields)
    return list(stub(server).CallTool(request, timeout=60))


def text_of(result: tool_pb2.ToolResult) -> str:
    return "".join(block.text for block in result.content)


def test_lists_the_builtin_tools_with_their_schemas(
    start_tools: StartTools, tmp_path: Path
) -> None:
    server = start_tools(file_search_roots=[tmp_path])
    tools = stub(server).ListTools(tool_pb2.ListToolsRequest(), timeout=10).tools
    assert {tool.name for tool in tools} == {"python", "file_search"}
    python = next(tool for tool in tools if tool.name == "python")
    assert python.server_label == "builtin"
    assert json.loads(python.input_schema_json)["required"] == ["code"]


def test_runs_python_and_returns_one_result_event(start_tools: StartTools) -> None:
    events = call(start_tools(), "python", {"code": "print(sum(range(10)))"})
    assert [event.WhichOneof("event") for event in events] == ["result"]
    result = events[0].result
    assert not result.is_error
    assert text_of(result) == "45"
    assert json.loads(result.structured_json)["exit_code"] == 0


def test_file_search_finds_lines_and_stays_in_its_roots(
    start_tools: StartTools, tmp_path: Path
) -> None:
    root = tmp_path / "docs"
    root.mkdir()
    (root / "guide.md").write_text("intro\nThe Gateway routes requests\n")
    (tmp_path / "outside.md").write_text("the gateway outside the root\n")
    (root / "link.md").symlink_to(tmp_path / "outside.md")
    server = start_tools(file_search_roots=[root])
    result = call(server, "file_search", {"query": "gateway"})[0].result
    assert not result.is_error
    assert text_of(result) == "docs/guide.md:2: The Gateway routes requests"


def test_stdio_mcp_server_tools_appear_under_their_label(start_tools: StartTools) -> None:
    server = start_tools(mcp_servers=[f"weather={WEATHER_STDIO}"])
    listed = stub(server).ListTools(tool_pb2.ListToolsRequest(server_label="weather"), timeout=10)
    assert {tool.name for tool in listed.tools} == {
        "weather__forecast",
        "weather__slow",
        "weather__explode",
    }
    result = call(server, "weather__forecast", {"city": "Oslo"})[-1].result
    assert text_of(result) == "forecast for Oslo: 4 degrees and sunny"


def test_http_mcp_server_streams_progress_then_the_result(
    start_tools: StartTools, weather_http: str
) -> None:
    server = start_tools(mcp_servers=[f"weather={weather_http}"])
    events = call(server, "weather__slow", {"seconds": 0.4})
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[-1] == "result" and kinds.count("result") == 1
    progress = [event.progress for event in events[:-1]]
    assert [p.progress for p in progress] == [0, 1, 2, 3]
    assert progress[0].total == 4 and progress[0].message == "step 0"
    assert text_of(events[-1].result) == "done"


def test_a_failing_mcp_tool_is_an_error_result(start_tools: StartTools, weather_http: str) -> None:
    server = start_tools(mcp_servers=[f"weather={weather_http}"])
    result = call(server, "weather__explode", {})[-1].result
    assert result.is_error
    assert "explode" in text_of(result)  # the SDK reports the failure without details
    # ...and the service still serves.
    assert not call(server, "python", {"code": "print(1)"})[-1].result.is_error


def test_a_call_over_its_timeout_is_an_error_result(
    start_tools: StartTools, weather_http: str
) -> None:
    server = start_tools(mcp_servers=[f"weather={weather_http}"])
    result = call(server, "weather__slow", {"seconds": 5}, timeout_s=0.5)[-1].result
    assert result.is_error
    assert "did not finish within 0.5 s" in text_of(result)


def test_a_result_over_the_size_limit_is_cut(start_tools: StartTools) -> None:
    server = start_tools(max_result_bytes=4096, python_output_bytes=60000)
    result = call(server, "python", {"code": "print('y' * 50000)"})[-1].result
    assert result.truncated
    assert len(text_of(result).encode()) < 4200
    assert text_of(result).endswith("[output truncated at 4096 bytes]")


def test_an_unreachable_mcp_server_leaves_the_builtin_tools_served(
    start_tools: StartTools,
) -> None:
    server = start_tools(mcp_servers=["gone=http://127.0.0.1:9/mcp"])
    health = stub(server).Health(tool_pb2.ToolHealthRequest(), timeout=10)
    assert health.serving
    assert [(s.label, s.connected) for s in health.servers] == [("gone", False)]
    assert health.servers[0].error
    assert not call(server, "python", {"code": "print(2)"})[-1].result.is_error


@pytest.mark.parametrize(
    ("name", "arguments", "code"),
    [
        ("nope", "{}", grpc.StatusCode.NOT_FOUND),
        ("python", "[1, 2]", grpc.StatusCode.INVALID_ARGUMENT),
        ("python", "{not json", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_caller_mistakes_are_status_codes(
    start_tools: StartTools, name: str, arguments: str, code: grpc.StatusCode
) -> None:
    server = start_tools()
    with pytest.raises(grpc.RpcError) as raised:
        call(server, name, arguments)
    assert raised.value.code() == code


def test_server_url_is_refused_unless_outbound_mcp_is_allowed(
    start_tools: StartTools, weather_http: str
) -> None:
    closed = start_tools()
    with pytest.raises(grpc.RpcError) as raised:
        call(closed, "forecast", {"city": "Rome"}, server_url=weather_http, server_label="w")
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED

    opened = start_tools(allow_outbound_mcp=True)
    listed = stub(opened).ListTools(
        tool_pb2.ListToolsRequest(server_label="w", server_url=weather_http), timeout=30
    )
    assert "w__forecast" in {tool.name for tool in listed.tools}
    result = call(opened, "forecast", {"city": "Rome"}, server_url=weather_http)[-1].result
    assert text_of(result) == "forecast for Rome: 4 degrees and sunny"
