"""The gateway as an MCP server: ``/mcp`` (Streamable HTTP) offers the platform's tools
(built-in tools and those of the configured MCP servers, as the tool service lists them).

Built on the official ``mcp`` SDK's low-level server and session manager, which serve both
eras of the protocol on one endpoint: the ``initialize`` handshake with ``Mcp-Session-Id``
(2025-11-25 and earlier) and the 2026-07-28 revision (``server/discover``, no sessions,
``Mcp-Method``/``Mcp-Name`` headers). The access middleware guards ``/mcp`` like ``/v1/``:
the API key is the bearer token, and rate limits apply.

A tool that fails is a ``CallToolResult`` with ``isError``; a call the tool service refuses
(an unknown tool, arguments that are not an object) is a JSON-RPC error.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import mcp_types as types
from mcp.server.lowlevel.server import Server
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError

from gateway.tool_client import ToolCallResult, ToolClient, ToolServiceError

MCP_PATH = "/mcp"


def _content(result: ToolCallResult) -> list[types.ContentBlock]:
    blocks: list[types.ContentBlock] = []
    for block in result.content:
        if block.type in ("image", "audio") and block.data:
            data = base64.b64encode(block.data).decode()
            if block.type == "image":
                blocks.append(types.ImageContent(data=data, mime_type=block.mime_type))
            else:
                blocks.append(types.AudioContent(data=data, mime_type=block.mime_type))
        elif block.text:
            blocks.append(types.TextContent(text=block.text))
    return blocks


def build_mcp_server(tools: ToolClient) -> Server[Any]:
    """The low-level MCP server whose tools are the tool service's. (On 2026-07-28 calls the
    SDK checks ``Mcp-Param-*`` headers against the schema its own ``tools/list`` gives, so
    they are held to what the tool service lists now.)"""

    async def list_tools(
        ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        try:
            described = await tools.list_tools()
        except ToolServiceError as exc:
            raise MCPError(types.INTERNAL_ERROR, exc.message) from None
        return types.ListToolsResult(
            tools=[
                types.Tool(
                    name=tool.name,
                    description=tool.description or None,
                    input_schema=tool.input_schema or {"type": "object"},
                )
                for tool in described
            ]
        )

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        async def progress(done: float, total: float, message: str) -> None:
            with contextlib.suppress(Exception):  # a client that asked for none
                await ctx.session.report_progress(done, total or None, message or None)

        try:
            result = await tools.call(params.name, params.arguments or {}, on_progress=progress)
        except ToolServiceError as exc:
            code = types.INVALID_PARAMS if exc.http_status == 400 else types.INTERNAL_ERROR
            raise MCPError(code, exc.message) from None
        structured = result.structured if isinstance(result.structured, dict) else None
        return types.CallToolResult(
            content=_content(result), is_error=result.is_error, structured_content=structured
        )

    return Server(
        "switchyard",
        version="0.1.0",
        instructions="The Switchyard platform's tools: built-in tools and connected MCP servers.",
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


class McpEndpoint:
    """The ``/mcp`` ASGI app and the lifespan of its session manager."""

    def __init__(self, tools: ToolClient) -> None:
        self.manager = StreamableHTTPSessionManager(
            app=build_mcp_server(tools),
            # The gateway is reached by name from other hosts; keys, not Host checks, guard it.
            security_settings=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        self.asgi = StreamableHTTPASGIApp(self.manager)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with self.manager.run():
            yield
