"""The gateway's client of the tool service (``switchyard.v1.ToolService``).

Callers get :class:`ToolCallResult` values (a tool that failed is a result with
``is_error``); the service's own refusals and outages raise :class:`ToolServiceError`, which
carries the gRPC status, so each API can answer in its own format.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from switchyard.grpc_utils import insecure_channel
from switchyard.v1 import tool_pb2, tool_pb2_grpc

ProgressCallback = Callable[[float, float, str], Awaitable[None]]


class ToolServiceError(Exception):
    """The tool service refused a request (unknown tool, bad arguments, outbound MCP off) or
    could not be reached."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return {
            grpc.StatusCode.NOT_FOUND: 400,
            grpc.StatusCode.INVALID_ARGUMENT: 400,
            grpc.StatusCode.PERMISSION_DENIED: 403,
            grpc.StatusCode.UNAVAILABLE: 503,
            grpc.StatusCode.DEADLINE_EXCEEDED: 504,
        }.get(self.code, 502)


@dataclass(frozen=True, slots=True)
class ToolDescription:
    name: str
    description: str
    input_schema: dict[str, Any]
    server_label: str
    server_tool_name: str

    @classmethod
    def of(cls, info: tool_pb2.ToolInfo) -> ToolDescription:
        schema = json.loads(info.input_schema_json) if info.input_schema_json else {}
        return cls(info.name, info.description, schema, info.server_label, info.server_tool_name)


@dataclass(slots=True)
class ToolCallResult:
    """A finished call: text blocks joined, the raw content, whether it failed."""

    text: str
    is_error: bool
    content: list[tool_pb2.ToolContent] = field(default_factory=list)
    structured: Any = None
    truncated: bool = False

    @classmethod
    def of(cls, result: tool_pb2.ToolResult) -> ToolCallResult:
        text = "".join(block.text for block in result.content if block.type == "text")
        structured = json.loads(result.structured_json) if result.structured_json else None
        return cls(text, result.is_error, list(result.content), structured, result.truncated)


def _error(exc: grpc.RpcError) -> ToolServiceError:
    code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else grpc.StatusCode.UNKNOWN
    details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"the tool service is unavailable: {details}"
    return ToolServiceError(code, details or code.name)


class ToolClient:
    """Lists and calls tools; one channel, made on first use (in the serving loop)."""

    def __init__(self, address: str, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: tool_pb2_grpc.ToolServiceStub | None = None

    def _service(self) -> tool_pb2_grpc.ToolServiceStub:
        if self._stub is None:
            self._channel = insecure_channel(self.address)
            self._stub = tool_pb2_grpc.ToolServiceStub(self._channel)
        return self._stub

    async def list_tools(
        self, server_label: str = "", *, server_url: str = "", headers: dict[str, str] | None = None
    ) -> list[ToolDescription]:
        request = tool_pb2.ListToolsRequest(
            server_label=server_label, server_url=server_url, headers=headers or {}
        )
        try:
            reply = await self._service().ListTools(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return [ToolDescription.of(info) for info in reply.tools]

    async def call(
        self,
        name: str,
        arguments: dict[str, Any],
        *,
        request_id: str = "",
        server_url: str = "",
        server_label: str = "",
        headers: dict[str, str] | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> ToolCallResult:
        request = tool_pb2.CallToolRequest(
            request_id=request_id,
            name=name,
            arguments_json=json.dumps(arguments),
            timeout_s=self.timeout_s,
            server_url=server_url,
            server_label=server_label,
            headers=headers or {},
        )
        result: tool_pb2.ToolResult | None = None
        try:
            # A little beyond the tool's own timeout, so that its error result arrives first.
            async for event in self._service().CallTool(request, timeout=self.timeout_s + 10):
                if event.HasField("progress") and on_progress is not None:
                    progress = event.progress
                    await on_progress(progress.progress, progress.total, progress.message)
                elif event.HasField("result"):
                    result = event.result
        except grpc.RpcError as exc:
            raise _error(exc) from None
        if result is None:
            raise ToolServiceError(grpc.StatusCode.INTERNAL, "the tool service sent no result")
        return ToolCallResult.of(result)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
