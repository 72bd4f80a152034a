"""What a tool is to the service: a description, and an async call that turns a JSON
arguments object into a :class:`ToolOutput`.

A tool reports progress through the ``progress`` callback it is handed and returns its
output; it may raise, and the registry (:mod:`tool_service.registry`) turns whatever it
raises into an error result. Built-in tools and MCP-server tools implement the same
interface.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from switchyard.v1 import tool_pb2

BUILTIN_LABEL = "builtin"
# A tool of an MCP server is called ``LABEL__NAME``; labels themselves hold no "__".
LABEL_SEPARATOR = "__"

ProgressFn = Callable[[float, float, str], Awaitable[None]]


class ToolError(Exception):
    """A tool could not do what was asked; the message goes back to the model as the
    tool's (error) output."""


@dataclass(slots=True)
class ToolOutput:
    """A tool's result: content blocks (text first), and optionally a structured value."""

    content: list[tool_pb2.ToolContent] = field(default_factory=list)
    is_error: bool = False
    structured: Any = None

    @classmethod
    def text(cls, text: str, *, is_error: bool = False, structured: Any = None) -> ToolOutput:
        return cls([tool_pb2.ToolContent(type="text", text=text)], is_error, structured)

    def to_proto(self) -> tool_pb2.ToolResult:
        return tool_pb2.ToolResult(
            content=self.content,
            is_error=self.is_error,
            structured_json="" if self.structured is None else json.dumps(self.structured),
        )


class Tool(ABC):
    """One callable tool. ``info.name`` is the name callers use."""

    info: tool_pb2.ToolInfo

    @abstractmethod
    async def call(self, arguments: dict[str, Any], progress: ProgressFn) -> ToolOutput:
        """Runs the tool; raises :class:`ToolError` (or anything else) when it fails."""


def require_string(arguments: dict[str, Any], name: str) -> str:
    value = arguments.get(name)
    if not isinstance(value, str):
        raise ToolError(f"argument {name!r} must be a string")
    return value
