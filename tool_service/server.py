"""The gRPC ``ToolService`` over a :class:`ToolRegistry`, with the standard health service.

``CallTool`` runs the tool in a task of its own and streams its progress events while it
runs, then its one result. Errors of the caller are gRPC statuses (NOT_FOUND,
INVALID_ARGUMENT, PERMISSION_DENIED); errors of the tool are error results.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from switchyard.grpc_utils import GrpcServer, abort_with, create_server, serve_until_signalled
from switchyard.settings import ToolServiceSettings
from switchyard.v1 import tool_pb2, tool_pb2_grpc
from tool_service.file_search import FileSearchTool
from tool_service.mcp_servers import (
    McpServerConnection,
    McpServerSpec,
    call_remote_tool,
    check_label,
    list_remote_tools,
)
from tool_service.python_tool import PythonLimits, PythonTool
from tool_service.registry import CallLimits, ToolRegistry, parse_arguments
from tool_service.tools import ProgressFn, Tool, ToolOutput

logger = logging.getLogger(__name__)

TOOL_SERVICE_NAME = tool_pb2.DESCRIPTOR.services_by_name["ToolService"].full_name
CONNECT_WAIT_S = 20.0
SHUTDOWN_GRACE_S = 5.0


def build_registry(settings: ToolServiceSettings) -> ToolRegistry:
    """The registry the settings describe (MCP connections not started yet)."""
    builtin: list[Tool] = []
    if settings.python_tool:
        limits = PythonLimits(
            cpu_s=settings.python_cpu_s,
            wall_s=settings.python_wall_s,
            memory_bytes=settings.python_memory_bytes,
            output_bytes=settings.python_output_bytes,
        )
        builtin.append(PythonTool(limits))
    if settings.file_search_roots:
        builtin.append(FileSearchTool(list(settings.file_search_roots)))
    servers = [McpServerConnection(McpServerSpec.parse(entry)) for entry in settings.mcp_servers]
    limits = CallLimits(
        default_timeout_s=settings.call_timeout_s,
        max_timeout_s=settings.max_call_timeout_s,
        max_result_bytes=settings.max_result_bytes,
    )
    return ToolRegistry(builtin, servers, limits)


class ToolServicer(tool_pb2_grpc.ToolServiceServicer):
    def __init__(self, registry: ToolRegistry, *, allow_outbound_mcp: bool) -> None:
        self.registry = registry
        self.allow_outbound_mcp = allow_outbound_mcp

    def _check_outbound(self, url: str, label: str) -> None:
        if not self.allow_outbound_mcp:
            raise PermissionError(
                "this tool service does not reach MCP servers by URL (allow_outbound_mcp is off)"
            )
        if not url.startswith(("http://", "https://")):
            raise ValueError("server_url must be an http:// or https:// URL")
        check_label(label)

    async def ListTools(
        self, request: tool_pb2.ListToolsRequest, context: grpc.aio.ServicerContext
    ) -> tool_pb2.ListToolsResponse:
        try:
            if request.server_url:
                self._check_outbound(request.server_url, request.server_label)
                try:
                    infos = await list_remote_tools(
                        request.server_label, request.server_url, dict(request.headers)
                    )
                except Exception as exc:
                    raise ConnectionError(
                        f"MCP server {request.server_url} did not list its tools: {exc}"
                    ) from exc
            else:
                infos = [tool.info for tool in self.registry.tools(request.server_label)]
        except (PermissionError, ValueError, LookupError, ConnectionError) as exc:
            await abort_with(context, exc)
        return tool_pb2.ListToolsResponse(tools=infos)

    async def CallTool(
        self, request: tool_pb2.CallToolRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tool_pb2.CallToolEvent]:
        try:
            arguments = parse_arguments(request.arguments_json)
            if request.server_url:
                self._check_outbound(request.server_url, request.server_label or "remote")
                url, headers, name = request.server_url, dict(request.headers), request.name

                async def run(progress: ProgressFn) -> ToolOutput:
                    return await call_remote_tool(url, headers, name, arguments, progress)

            else:
                tool = self.registry.find(request.name)

                async def run(progress: ProgressFn) -> ToolOutput:
                    return await tool.call(arguments, progress)

        except (PermissionError, ValueError, LookupError) as exc:
            await abort_with(context, exc)

        events: asyncio.Queue[tool_pb2.CallToolEvent] = asyncio.Queue()

        async def progress(done: float, total: float, message: str) -> None:
            await events.put(
                tool_pb2.CallToolEvent(
                    progress=tool_pb2.ToolProgress(progress=done, total=total, message=message)
                )
            )

        logger.info("tool call", extra={"request_id": request.request_id, "tool": request.name})
        call = asyncio.create_task(
            self.registry.call(request.name, run, request.timeout_s, progress)
        )
        try:
            while not call.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, call}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            result = call.result()
        finally:
            if not call.done():  # the caller went away: stop the tool
                call.cancel()
        logger.info(
            "tool call finished",
            extra={
                "request_id": request.request_id,
                "tool": request.name,
                "is_error": result.is_error,
                "duration_s": round(result.duration_s, 4),
            },
        )
        yield tool_pb2.CallToolEvent(result=result)

    async def Health(
        self, request: tool_pb2.ToolHealthRequest, context: grpc.aio.ServicerContext
    ) -> tool_pb2.ToolHealthResponse:
        return tool_pb2.ToolHealthResponse(
            serving=True,
            builtin_tools=sorted(self.registry.builtin),
            servers=[
                tool_pb2.McpServerStatus(
                    label=label,
                    target=connection.spec.target,
                    connected=connection.connected,
                    num_tools=len(connection.tools),
                    error=connection.error,
                )
                for label, connection in self.registry.servers.items()
            ],
        )


class ToolServer:
    """The service's lifecycle: bind, connect the MCP servers, serve, stop."""

    def __init__(self, settings: ToolServiceSettings) -> None:
        self.settings = settings
        self.registry = build_registry(settings)
        self.grpc: GrpcServer | None = None

    @property
    def port(self) -> int:
        assert self.grpc is not None
        return self.grpc.port

    async def start(self) -> None:
        self.grpc = create_server(self.settings.host, self.settings.port, [TOOL_SERVICE_NAME])
        servicer = ToolServicer(self.registry, allow_outbound_mcp=self.settings.allow_outbound_mcp)
        tool_pb2_grpc.add_ToolServiceServicer_to_server(servicer, self.grpc.server)
        await self.grpc.start()
        connections = list(self.registry.servers.values())
        for connection in connections:
            connection.start()
        # Serve once every server had its chance to connect; one that is down does not keep
        # the built-in tools from being served, and keeps being retried.
        await asyncio.gather(*(c.wait_connected(CONNECT_WAIT_S) for c in connections))
        for connection in connections:
            if not connection.connected:
                logger.warning(
                    "MCP server not connected at startup; retrying in the background",
                    extra={"label": connection.spec.label, "error": connection.error},
                )
        await self.grpc.set_serving(True)
        logger.info(
            "tool service serving",
            extra={"port": self.grpc.port, "tools": [t.info.name for t in self.registry.tools()]},
        )

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        if self.grpc is not None:
            await self.grpc.stop(grace_s)
        for connection in self.registry.servers.values():
            await connection.close()


async def serve(settings: ToolServiceSettings) -> None:
    server = ToolServer(settings)
    await serve_until_signalled(server.start, server.stop)
