"""Connections to external MCP servers, made with the official ``mcp`` SDK.

A server is configured as ``LABEL=TARGET``: a TARGET that starts with ``http://`` or
``https://`` is a Streamable HTTP endpoint, anything else a command line that speaks MCP on
its stdin/stdout (started by the service, shell-split, not through a shell). The client
negotiates the protocol era itself (``server/discover`` first, ``initialize`` for older
servers).

:class:`McpServerConnection` keeps one client session open for the service's lifetime, in a
task of its own (the SDK's contexts must be entered and left in one task), and reconnects
with backoff when the server goes away. Its tools are offered as ``LABEL__NAME``.
:func:`list_remote_tools` and :func:`call_remote_tool` reach a server that is not configured
(``server_url``), one session per call.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import shlex
from dataclasses import dataclass
from typing import Any

import mcp_types
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from switchyard.v1 import tool_pb2
from tool_service.tools import LABEL_SEPARATOR, ProgressFn, Tool, ToolError, ToolOutput

logger = logging.getLogger(__name__)

UP_ID_ENV = "SWITCHYARD_UP_ID"  # switchyard.cli.UP_ID_ENV
LABEL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9-]*(_[A-Za-z0-9-]+)*$")
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class McpServerSpec:
    """A configured server: its label and its URL or command line."""

    label: str
    target: str

    @property
    def is_http(self) -> bool:
        return self.target.startswith(("http://", "https://"))

    @classmethod
    def parse(cls, text: str) -> McpServerSpec:
        """``LABEL=URL_OR_COMMAND``; raises ``ValueError`` for a malformed entry."""
        label, sep, target = text.partition("=")
        label, target = label.strip(), target.strip()
        if not sep or not target:
            raise ValueError(f"MCP server {text!r} must be LABEL=URL_OR_COMMAND")
        check_label(label)
        return cls(label, target)


def check_label(label: str) -> None:
    if not LABEL_PATTERN.match(label) or LABEL_SEPARATOR in label or label == "builtin":
        raise ValueError(
            f"MCP server label {label!r} must start with a letter and hold only letters, "
            "digits, '-' and single '_' (and not be 'builtin')"
        )


def _client_for(target: str, headers: dict[str, str] | None = None) -> Client:
    if target.startswith(("http://", "https://")):
        http = create_mcp_http_client(headers=headers or None)
        return Client(streamable_http_client(target, http_client=http), cache=None)
    argv = shlex.split(target)
    if not argv:
        raise ValueError("empty MCP server command")
    # The SDK gives the server a minimal environment of its own; `switchyard up`'s marker
    # goes along, so that `up` can find and stop the server even if this service dies.
    marker = {UP_ID_ENV: os.environ[UP_ID_ENV]} if UP_ID_ENV in os.environ else None
    return Client(StdioServerParameters(command=argv[0], args=argv[1:], env=marker), cache=None)


def tool_info(label: str, tool: mcp_types.Tool) -> tool_pb2.ToolInfo:
    import json

    return tool_pb2.ToolInfo(
        name=f"{label}{LABEL_SEPARATOR}{tool.name}",
        description=tool.description or "",
        input_schema_json=json.dumps(tool.input_schema),
        server_label=label,
        server_tool_name=tool.name,
    )


def output_of(result: mcp_types.CallToolResult) -> ToolOutput:
    """The SDK's tool result as the service's."""
    content: list[tool_pb2.ToolContent] = []
    for block in result.content:
        if isinstance(block, mcp_types.TextContent):
            content.append(tool_pb2.ToolContent(type="text", text=block.text))
        elif isinstance(block, mcp_types.ImageContent | mcp_types.AudioContent):
            content.append(
                tool_pb2.ToolContent(
                    type=block.type, data=base64.b64decode(block.data), mime_type=block.mime_type
                )
            )
        elif isinstance(block, mcp_types.EmbeddedResource):
            resource = block.resource
            text = getattr(resource, "text", "")
            content.append(
                tool_pb2.ToolContent(
                    type="resource",
                    uri=str(resource.uri),
                    text=text,
                    mime_type=resource.mime_type or "",
                )
            )
        elif isinstance(block, mcp_types.ResourceLink):
            content.append(tool_pb2.ToolContent(type="resource", uri=str(block.uri)))
    return ToolOutput(content, bool(result.is_error), result.structured_content)


class McpServerConnection:
    """One configured server, kept connected; its tools once connected."""

    def __init__(self, spec: McpServerSpec) -> None:
        self.spec = spec
        self.tools: list[McpTool] = []
        self.error = "not connected yet"
        self._client: Client | None = None
        self._connected = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._client is not None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"mcp-{self.spec.label}")

    async def wait_connected(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        return self.connected

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 10)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await self._task

    async def _run(self) -> None:
        delay = RECONNECT_MIN_S
        while not self._stop.is_set():
            try:
                async with _client_for(self.spec.target) as client:
                    listed = await client.list_tools()
                    self.tools = [McpTool(self, tool) for tool in listed.tools]
                    self._client = client
                    self.error = ""
                    self._connected.set()
                    delay = RECONNECT_MIN_S
                    logger.info(
                        "MCP server connected",
                        extra={"label": self.spec.label, "tools": len(self.tools)},
                    )
                    await self._stop.wait()
            except Exception as exc:  # any failure of the server: log, wait, reconnect
                self.error = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "MCP server unavailable",
                    extra={"label": self.spec.label, "error": self.error},
                )
            finally:
                self._client = None
                self._connected.clear()
            if self._stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def call(self, name: str, arguments: dict[str, Any], progress: ProgressFn) -> ToolOutput:
        client = self._client
        if client is None:
            raise ToolError(f"MCP server {self.spec.label!r} is not connected: {self.error}")

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            await progress(done, total or 0.0, message or "")

        result = await client.call_tool(name, arguments, progress_callback=on_progress)
        return output_of(result)


class McpTool(Tool):
    """A tool of a connected server."""

    def __init__(self, connection: McpServerConnection, tool: mcp_types.Tool) -> None:
        self.connection = connection
        self.info = tool_info(connection.spec.label, tool)

    async def call(self, arguments: dict[str, Any], progress: ProgressFn) -> ToolOutput:
        return await self.connection.call(self.info.server_tool_name, arguments, progress)


async def list_remote_tools(
    label: str, url: str, headers: dict[str, str]
) -> list[tool_pb2.ToolInfo]:
    """The tools of the Streamable HTTP server at ``url``, under ``label``."""
    async with _client_for(url, headers) as client:
        listed = await client.list_tools()
    return [tool_info(label, tool) for tool in listed.tools]


async def call_remote_tool(
    url: str, headers: dict[str, str], name: str, arguments: dict[str, Any], progress: ProgressFn
) -> ToolOutput:
    """Calls ``name`` on the Streamable HTTP server at ``url``, in a session of its own."""

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        await progress(done, total or 0.0, message or "")

    async with _client_for(url, headers) as client:
        result = await client.call_tool(name, arguments, progress_callback=on_progress)
    return output_of(result)
