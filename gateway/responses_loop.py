"""One ``/v1/responses`` request run to the end: the server-side tool loop, as a stream of
the Responses API's typed events.

```
resolve tools ──▶ [mcp_list_tools items] ──▶ turn: prompt ▸ generate ▸ parse ─┬─▶ text: message item, done
 (tool service)                                 ▲                             ├─▶ function call: item, done (the client runs it)
                                                │  tool result appended       ├─▶ MCP/platform call needing approval:
                                                └──── mcp_call item ◀─────────┘     mcp_approval_request item, done
```

A turn is one generation. When the model calls an ``mcp`` or platform tool the gateway runs
it through the tool service, emits an ``mcp_call`` item, appends the call and its output to
the conversation and starts the next turn; a ``function`` tool call goes back to the client
as a ``function_call`` item and ends the response. ``tool_choice`` forcing a tool applies to
the first turn (later turns choose freely, so the loop can end). The loop stops after
``max_iterations`` turns or ``max_tool_calls`` calls (status ``incomplete``).

The non-streamed answer is the ``response`` of the last event, so streamed and non-streamed
responses carry the same items.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from gateway.chat import ChatFormat, ToolChoice
from gateway.generation import GenerationSpec, Generator
from gateway.tool_calls import ParsedDelta, ToolSpec
from gateway.tool_client import ToolClient
from switchyard.v1 import common_pb2

BUILTIN_LABEL = "builtin"


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def model_tool_name(server_label: str, name: str) -> str:
    """The name the model calls an MCP or platform tool by (the tool service's name)."""
    return name if server_label == BUILTIN_LABEL else f"{server_label}__{name}"


@dataclass(slots=True)
class ResolvedTool:
    """A tool offered to the model, and how a call of it is run."""

    spec: ToolSpec
    kind: str  # "function" or "mcp"
    server_label: str = ""
    server_tool_name: str = ""
    server_url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    needs_approval: bool = False


@dataclass(slots=True)
class ListedServer:
    """An MCP server whose tools this response lists (an ``mcp_list_tools`` item)."""

    server_label: str
    tools: list[dict[str, Any]]


@dataclass(slots=True)
class RunPlan:
    """Everything the loop needs, settled (and validated) before the response starts."""

    response_id: str
    model: str
    conversation: list[dict[str, Any]]  # earlier items + this request's input items
    input_items: list[dict[str, Any]]
    instructions: str | None
    tools: dict[str, ResolvedTool]  # by the name the model sees
    listed: list[ListedServer]
    first_choice: ToolChoice
    text_constraint: common_pb2.StructuredOutput | None
    approvals: list[tuple[dict[str, Any], bool]]  # (approval request item, approved)
    sampling: common_pb2.SamplingParams
    max_output_tokens: int | None
    max_tool_calls: int | None
    max_iterations: int
    parallel_tool_calls: bool
    echo: dict[str, Any]  # request fields the response object repeats


def to_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as chat messages for the chat template."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})

    def call_message(call_id: str, name: str, arguments: str) -> None:
        try:
            parsed = json.loads(arguments) if arguments else {}
        except json.JSONDecodeError:
            parsed = {}
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": parsed}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
            last["tool_calls"].append(call)
        else:
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})

    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            content = item["content"]
            if isinstance(content, list):
                content = "".join(part.get("text") or "" for part in content)
            messages.append({"role": role, "content": content})
        elif kind == "function_call":
            call_message(item["call_id"], item["name"], item["arguments"])
        elif kind == "function_call_output":
            output = item["output"]
            if isinstance(output, list):
                output = "".join(part.get("text") or "" for part in output)
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        elif kind == "mcp_call":
            call_id = item.get("id") or new_id("mcp")
            name = model_tool_name(item["server_label"], item["name"])
            call_message(call_id, name, item["arguments"])
            result = item.get("output") if item.get("error") is None else f"error: {item['error']}"
            messages.append({"role": "tool", "tool_call_id": call_id, "content": result or ""})
    return messages


class ResponseRun:
    """Runs a :class:`RunPlan`; :meth:`events` yields the typed events of the stream."""

    def __init__(
        self,
        plan: RunPlan,
        generator: Generator,
        chat: ChatFormat,
        tools: ToolClient | None,
        tool_calls: Counter | None = None,
    ) -> None:
        self.plan = plan
        self.tool_calls = tool_calls
        self.generator = generator
        self.chat = chat
        self.tool_client = tools
        self.output: list[dict[str, Any]] = []
        self.input_tokens = 0
        self.output_tokens = 0
        self.sequence = 0
        self.created_at = int(time.time())
        self.status = "in_progress"
        self.incomplete_reason: str | None = None
        self.error: dict[str, Any] | None = None

    # -- the response object -----------------------------------------------------------------

    def response(self) -> dict[str, Any]:
        plan = self.plan
        text = "".join(
            part["text"]
            for item in self.output
            if item["type"] == "message"
            for part in item["content"]
            if part["type"] == "output_text"
        )
        return {
            "id": plan.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "model": plan.model,
            "output": self.output,
            "output_text": text,
            "error": self.error,
            "incomplete_details": (
                {"reason": self.incomplete_reason} if self.incomplete_reason else None
            ),
            "usage": {
                "input_tokens": self.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.input_tokens + self.output_tokens,
            },
            **plan.echo,
        }

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    # -- the loop ------------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        plan = self.plan
        yield self._event("response.created", response=self.response())
        yield self._event("response.in_progress", response=self.response())
        for listed in plan.listed:
            for event in self._list_tools_item(listed):
                yield event
        messages = to_messages(plan.instructions, plan.conversation)
        calls_made = 0
        for request_item, approved in plan.approvals:
            async for event in self._run_approved(request_item, approved, messages):
                yield event
            calls_made += 1
        choice = plan.first_choice
        for turn in range(plan.max_iterations):
            parsed = ParsedDelta()
            message_item: dict[str, Any] | None = None
            finish_reason = "stop"
            async for delta_parsed, finish in self._turn(messages, choice, turn):
                parsed.extend(delta_parsed)
                if delta_parsed.content:
                    if message_item is None:
                        message_item = self._new_message()
                        for event in self._open_message(message_item):
                            yield event
                    message_item["content"][0]["text"] += delta_parsed.content
                    yield self._event(
                        "response.output_text.delta",
                        item_id=message_item["id"],
                        output_index=len(self.output) - 1,
                        content_index=0,
                        delta=delta_parsed.content,
                        logprobs=[],
                    )
                if finish is not None:
                    finish_reason = finish
            if message_item is not None:
                for event in self._close_message(message_item):
                    yield event
            calls = _tool_calls(parsed)
            if finish_reason == "length":
                self.status, self.incomplete_reason = "incomplete", "max_output_tokens"
                break
            if not calls:
                self.status = "completed"
                break
            choice = ToolChoice("auto")
            client_side = False
            for call_id, name, arguments in calls:
                tool = plan.tools.get(name)
                if tool is None or tool.kind == "function":
                    client_side = True
                    for event in self._function_call_item(call_id, name, arguments):
                        yield event
                    continue
                if tool.needs_approval:
                    client_side = True
                    for event in self._approval_request_item(tool, arguments):
                        yield event
                    continue
                if plan.max_tool_calls is not None and calls_made >= plan.max_tool_calls:
                    self.status, self.incomplete_reason = "incomplete", "max_tool_calls"
                    break
                calls_made += 1
                async for event in self._mcp_call(tool, arguments, messages, call_id):
                    yield event
            if self.status == "incomplete":
                break
            if client_side:
                self.status = "completed"
                break
        else:
            self.status, self.incomplete_reason = "incomplete", "max_tool_calls"
        final = "response.completed" if self.status == "completed" else "response.incomplete"
        yield self._event(final, response=self.response())

    async def _turn(
        self, messages: list[dict[str, Any]], choice: ToolChoice, turn: int
    ) -> AsyncIterator[tuple[ParsedDelta, str | None]]:
        plan = self.plan
        specs = [tool.spec for tool in plan.tools.values()]
        prompt_ids = await self.chat.encode(messages, specs, choice, {})
        structured = self.chat.tool_constraint(specs, choice, parallel=plan.parallel_tool_calls)
        if structured is None and (choice.mode == "none" or not specs):
            structured = plan.text_constraint
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(plan.sampling)
        sampling.stop_token_ids.extend(self.chat.stop_token_ids())
        remaining = None
        if plan.max_output_tokens is not None:
            remaining = max(plan.max_output_tokens - self.output_tokens, 1)
        context = self.generator.max_model_len()
        if context is not None and turn > 0:
            # Later turns carry the tool results; they get what is left of the context
            # rather than failing for want of it (the loop then ends "incomplete").
            room = max(context - len(prompt_ids), 1)
            remaining = room if remaining is None else min(remaining, room)
        spec = GenerationSpec(
            request_id=f"{plan.response_id}-{turn}",
            model=plan.model,
            prompt_token_ids=prompt_ids,
            sampling=sampling,
            max_tokens=remaining,
            structured=structured,
        )
        parser = self.chat.output_parser(specs, choice)
        self.input_tokens += len(prompt_ids)
        async for delta in self.generator.generate(spec):
            parsed = parser.feed(delta.text, delta.token_ids)
            self.output_tokens += len(delta.token_ids)
            if delta.finish_reason is not None:
                parsed.extend(parser.finish())
            yield parsed, delta.finish_reason

    # -- items ---------------------------------------------------------------------------------

    def _add(self, item: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.output.append(item)
        index = len(self.output) - 1
        return index, self._event("response.output_item.added", output_index=index, item=item)

    def _done(self, index: int) -> dict[str, Any]:
        return self._event("response.output_item.done", output_index=index, item=self.output[index])

    def _list_tools_item(self, listed: ListedServer) -> list[dict[str, Any]]:
        item = {
            "id": new_id("mcpl"),
            "type": "mcp_list_tools",
            "server_label": listed.server_label,
            "tools": listed.tools,
            "error": None,
        }
        index, added = self._add(item)
        return [
            added,
            self._event(
                "response.mcp_list_tools.in_progress", item_id=item["id"], output_index=index
            ),
            self._event(
                "response.mcp_list_tools.completed", item_id=item["id"], output_index=index
            ),
            self._done(index),
        ]

    def _new_message(self) -> dict[str, Any]:
        return {
            "id": new_id("msg"),
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}],
        }

    def _open_message(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        shown = {**item, "content": []}
        self.output.append(item)
        index = len(self.output) - 1
        return [
            self._event("response.output_item.added", output_index=index, item=shown),
            self._event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": []},
            ),
        ]

    def _close_message(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        index = self.output.index(item)
        item["status"] = "completed"
        part = item["content"][0]
        return [
            self._event(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=part["text"],
                logprobs=[],
            ),
            self._event(
                "response.content_part.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part={"type": "output_text", "text": part["text"], "annotations": []},
            ),
            self._done(index),
        ]

    def _function_call_item(self, call_id: str, name: str, arguments: str) -> list[dict[str, Any]]:
        item = {
            "id": new_id("fc"),
            "type": "function_call",
            "call_id": call_id,
            "name": name,
            "arguments": arguments,
            "status": "completed",
        }
        index, added = self._add({**item, "arguments": "", "status": "in_progress"})
        self.output[index] = item
        return [
            added,
            self._event(
                "response.function_call_arguments.delta",
                item_id=item["id"],
                output_index=index,
                delta=arguments,
            ),
            self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                arguments=arguments,
                name=name,
            ),
            self._done(index),
        ]

    def _approval_request_item(self, tool: ResolvedTool, arguments: str) -> list[dict[str, Any]]:
        item = {
            "id": new_id("mcpr"),
            "type": "mcp_approval_request",
            "server_label": tool.server_label,
            "name": tool.server_tool_name,
            "arguments": arguments,
        }
        index, added = self._add(item)
        return [added, self._done(index)]

    async def _run_approved(
        self, request_item: dict[str, Any], approved: bool, messages: list[dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:
        name = model_tool_name(request_item["server_label"], request_item["name"])
        tool = self.plan.tools.get(name)
        if tool is None or not approved:
            reason = "the call was not approved" if tool else f"the tool {name!r} is not offered"
            async for event in self._mcp_call(
                tool, request_item["arguments"], messages, new_id("mcp"), refused=reason,
                request_item=request_item,
            ):  # fmt: skip
                yield event
            return
        async for event in self._mcp_call(
            tool, request_item["arguments"], messages, new_id("mcp"), request_item=request_item
        ):
            yield event

    async def _mcp_call(
        self,
        tool: ResolvedTool | None,
        arguments: str,
        messages: list[dict[str, Any]],
        call_id: str,
        *,
        refused: str | None = None,
        request_item: dict[str, Any] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        label = tool.server_label if tool else (request_item or {}).get("server_label", "")
        name = tool.server_tool_name if tool else (request_item or {}).get("name", "")
        item: dict[str, Any] = {
            "id": new_id("mcp"),
            "type": "mcp_call",
            "server_label": label,
            "name": name,
            "arguments": arguments,
            "output": None,
            "error": None,
            "status": "in_progress",
        }
        if request_item is not None:
            item["approval_request_id"] = request_item["id"]
        index, added = self._add(dict(item))
        yield added
        yield self._event(
            "response.mcp_call_arguments.delta",
            item_id=item["id"],
            output_index=index,
            delta=arguments,
        )
        yield self._event(
            "response.mcp_call_arguments.done",
            item_id=item["id"],
            output_index=index,
            arguments=arguments,
        )
        yield self._event("response.mcp_call.in_progress", item_id=item["id"], output_index=index)
        if refused is not None or tool is None:
            item["error"] = refused or "the tool is not offered"
        else:
            item["output"], item["error"] = await self._call_tool(tool, arguments)
        item["status"] = "failed" if item["error"] is not None else "completed"
        self.output[index] = item
        outcome = "failed" if item["error"] is not None else "completed"
        if self.tool_calls is not None:
            self.tool_calls.labels(label or "unknown", outcome).inc()
        yield self._event(f"response.mcp_call.{outcome}", item_id=item["id"], output_index=index)
        yield self._done(index)
        to_messages_item = {**item, "id": call_id}
        messages.extend(to_messages(None, [to_messages_item]))

    async def _call_tool(self, tool: ResolvedTool, arguments: str) -> tuple[str | None, str | None]:
        """(output, error) of one call; a failing tool is an error, not an exception."""
        if self.tool_client is None:
            return None, "no tool service is configured"
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            return None, f"the arguments are not valid JSON: {exc}"
        if not isinstance(parsed, dict):
            return None, "the arguments must be a JSON object"
        from gateway.tool_client import ToolServiceError

        try:
            result = await self.tool_client.call(
                tool.spec.name if not tool.server_url else tool.server_tool_name,
                parsed,
                request_id=self.plan.response_id,
                server_url=tool.server_url,
                server_label=tool.server_label,
                headers=tool.headers,
            )
        except ToolServiceError as exc:
            return None, exc.message
        if result.is_error:
            return None, result.text or "the tool failed"
        return result.text, None


def _tool_calls(parsed: ParsedDelta) -> list[tuple[str, str, str]]:
    """(call id, name, arguments) of every call a turn made, in order."""
    calls: dict[int, list[str]] = {}
    for part in parsed.tool_calls:
        if part.id is not None:
            calls[part.index] = [part.id, part.name or "", part.arguments]
        elif part.index in calls:
            calls[part.index][2] += part.arguments
    return [(c[0], c[1], c[2]) for _, c in sorted(calls.items())]
