"""The service's tools by name, and the one place a call is bounded: a per-call timeout and
a result size limit. A failing tool becomes an error result here, never an exception."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from switchyard.v1 import tool_pb2
from tool_service.mcp_servers import McpServerConnection
from tool_service.tools import BUILTIN_LABEL, ProgressFn, Tool, ToolError, ToolOutput

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CallLimits:
    default_timeout_s: float = 60.0
    max_timeout_s: float = 300.0
    max_result_bytes: int = 1 << 20

    def timeout_for(self, asked_s: float) -> float:
        return min(asked_s, self.max_timeout_s) if asked_s > 0 else self.default_timeout_s


class ToolRegistry:
    """Built-in tools and the tools of the configured MCP servers."""

    def __init__(
        self, builtin: list[Tool], servers: list[McpServerConnection], limits: CallLimits
    ) -> None:
        self.builtin = {tool.info.name: tool for tool in builtin}
        self.servers = {connection.spec.label: connection for connection in servers}
        self.limits = limits

    def tools(self, label: str = "") -> list[Tool]:
        """Every tool on offer now, or only those of ``label``; raises ``LookupError`` for
        a label that is neither ``builtin`` nor a configured server."""
        if label and label != BUILTIN_LABEL and label not in self.servers:
            raise LookupError(f"no MCP server is configured with the label {label!r}")
        found: list[Tool] = []
        if label in ("", BUILTIN_LABEL):
            found.extend(self.builtin.values())
        for server_label, connection in self.servers.items():
            if label in ("", server_label):
                found.extend(connection.tools)
        return found

    def find(self, name: str) -> Tool:
        """The tool called ``name``; raises ``LookupError``."""
        tool = self.builtin.get(name)
        if tool is not None:
            return tool
        for connection in self.servers.values():
            for candidate in connection.tools:
                if candidate.info.name == name:
                    return candidate
        raise LookupError(f"no tool named {name!r}")

    async def call(
        self,
        name: str,
        run: Callable[[ProgressFn], Awaitable[ToolOutput]],
        timeout_s: float,
        progress: ProgressFn,
    ) -> tool_pb2.ToolResult:
        """Runs ``run`` under the timeout and size limits; whatever goes wrong inside is an
        error result."""
        started = time.monotonic()
        timeout = self.limits.timeout_for(timeout_s)
        try:
            output = await asyncio.wait_for(run(progress), timeout)
        except TimeoutError:
            output = ToolOutput.text(
                f"tool {name!r} did not finish within {timeout:g} s", is_error=True
            )
        except ToolError as exc:
            output = ToolOutput.text(str(exc), is_error=True)
        except Exception as exc:
            logger.warning("tool failed", extra={"tool": name, "error": repr(exc)})
            output = ToolOutput.text(f"tool {name!r} failed: {exc}", is_error=True)
        result = output.to_proto()
        _cap(result, self.limits.max_result_bytes)
        result.duration_s = time.monotonic() - started
        return result


def _cap(result: tool_pb2.ToolResult, limit: int) -> None:
    """Cuts the result's content to ``limit`` bytes in all, marking it truncated."""
    used = len(result.structured_json)
    if used > limit:
        result.structured_json = ""
        result.truncated = True
        used = 0
    kept: list[tool_pb2.ToolContent] = []
    for block in result.content:
        size = len(block.text.encode()) + len(block.data)
        if used + size <= limit:
            kept.append(block)
            used += size
            continue
        result.truncated = True
        room = limit - used
        if block.text and room > 0:
            cut = block.text.encode()[:room].decode(errors="ignore")
            kept.append(tool_pb2.ToolContent(type="text", text=cut))
        break
    if result.truncated:
        kept.append(
            tool_pb2.ToolContent(type="text", text=f"\n[output truncated at {limit} bytes]")
        )
        del result.content[:]
        result.content.extend(kept)


def parse_arguments(text: str) -> dict[str, Any]:
    """A call's arguments: a JSON object (empty text is ``{}``); raises ``ValueError``."""
    import json

    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"arguments are not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("arguments must be a JSON object")
    return value
