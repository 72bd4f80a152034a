"""Platform tools in Chat Completions and in Anthropic's Messages API.

A chat request whose ``tools`` hold ``{"type": "mcp", "server_label": ...}`` entries, or a
Messages request with ``mcp_servers``, runs the same server-side tool loop as
``/v1/responses`` (:mod:`gateway.responses_loop`): the request is restated as a Responses
request (messages become input items, tools and ``tool_choice`` map across), the loop runs,
and its items are shaped back into the API that was called:

- Chat Completions: the final text is ``message.content``; ``function`` tool calls are
  ``message.tool_calls`` (``finish_reason: "tool_calls"``) as usual; the MCP calls the
  gateway ran are listed in ``message.mcp_calls`` (``server_label``, ``name``, ``arguments``,
  ``output``, ``error``), an extension field.
- Messages: Anthropic's MCP connector blocks, ``mcp_tool_use`` then ``mcp_tool_result`` for
  each call the gateway ran, then the ``text`` (and ``tool_use`` for client tools).
  ``mcp_servers`` entries are ``{"type": "url", "name", "url", "authorization_token"?,
  "tool_configuration"?: {"enabled", "allowed_tools"}}``; a ``name`` that is a configured
  server's label uses that server, any other is reached at ``url`` (only when outbound MCP is
  allowed).

Streamed requests stream the final text as it is generated, in each API's own chunks.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from gateway.anthropic_api import McpToolResultBlock, McpToolUseBlock, MessagesRequest
from gateway.errors import OpenAIError, invalid_request
from gateway.openai_api import AssistantMessageParam, ChatCompletionRequest, ToolMessageParam
from gateway.openai_routes import openai_error_for
from gateway.responses_api import ResponsesRequest
from gateway.responses_loop import ResponseRun
from gateway.responses_routes import GENERATION_FAILURES, ResponsesRoutes
from gateway.serving import until_disconnected
from gateway.tool_client import ToolServiceError


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(getattr(part, "text", None) or "" for part in content)


def _arguments(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class PlatformChat:
    """Runs chat and Messages requests that name platform tools through the tool loop."""

    def __init__(self, responses: ResponsesRoutes) -> None:
        self.responses = responses

    # -- shared ----------------------------------------------------------------------------------

    async def _run(self, restated: dict[str, Any]) -> ResponseRun:
        try:
            request = ResponsesRequest.model_validate(restated)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise invalid_request(
                f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
            ) from None
        plan = await self.responses.plan(request)
        routes = self.responses
        return ResponseRun(plan, routes.generator, routes.chat, routes.tools, routes.tool_calls)

    # -- Chat Completions --------------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        if body.n != 1:
            raise invalid_request("n must be 1 with mcp tools", param="n")
        if body.logprobs:
            raise invalid_request("logprobs are not returned with mcp tools", param="logprobs")
        if body.stop_strings:
            raise invalid_request("stop is not supported with mcp tools", param="stop")
        items: list[dict[str, Any]] = []
        for message in body.messages:
            role = message.role
            if isinstance(message, ToolMessageParam):
                items.append(
                    {
                        "type": "function_call_output",
                        "call_id": message.tool_call_id,
                        "output": _text(message.content),
                    }
                )
                continue
            text = _text(message.content)
            calls = message.tool_calls if isinstance(message, AssistantMessageParam) else None
            if text or not calls:
                items.append({"type": "message", "role": role, "content": text})
            for call in calls or []:
                items.append(
                    {
                        "type": "function_call",
                        "call_id": call.id,
                        "name": call.function.name,
                        "arguments": _arguments(call.function.arguments),
                    }
                )
        tools: list[dict[str, Any]] = []
        for tool in body.tools or []:
            if tool.type == "function":
                function = tool.function
                tools.append(
                    {
                        "type": "function",
                        "name": function.name,
                        "description": function.description,
                        "parameters": function.parameters,
                    }
                )
            else:
                tools.append(tool.model_dump(exclude_none=True))
        choice: Any = body.tool_choice
        if choice is not None and not isinstance(choice, str):
            choice = (
                {"type": "function", "name": choice.function.name}
                if choice.type == "function"
                else choice.model_dump(exclude_none=True)
            )
        text_format = None
        if body.response_format is not None and body.response_format.type != "text":
            text_format = {"type": body.response_format.type}
            if body.response_format.json_schema is not None:
                text_format["schema"] = body.response_format.json_schema.schema_
        restated = {
            "model": body.model,
            "input": items,
            "tools": tools,
            "tool_choice": choice,
            "max_output_tokens": body.output_limit,
            "parallel_tool_calls": body.parallel_tool_calls,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "seed": body.seed,
            "store": False,
            **({"text": {"format": text_format}} if text_format else {}),
        }
        run = await self._run(restated)
        chat_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            events = run.events()
            first = await _first_generation_event(events)
            stream = _chat_stream(run, events, first, chat_id, created, body)
            return StreamingResponse(stream, media_type="text/event-stream")
        await _drain(request, run)
        message, finish = _chat_message(run)
        usage = _chat_usage(run)
        return JSONResponse(
            {
                "id": chat_id,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
                ],
                "usage": usage,
            },
            headers={"x-request-id": chat_id},
        )

    # -- Anthropic Messages ----------------------------------------------------------------------

    async def messages(self, body: MessagesRequest, request: Request) -> Response:
        items: list[dict[str, Any]] = []
        if body.system_text:
            items.append({"type": "message", "role": "system", "content": body.system_text})
        for message in body.messages:
            if isinstance(message.content, str):
                items.append({"type": "message", "role": message.role, "content": message.content})
                continue
            text = "".join(
                getattr(block, "text", "") for block in message.content if block.type == "text"
            )
            if text:
                items.append({"type": "message", "role": message.role, "content": text})
            results = {
                block.tool_use_id: block
                for block in message.content
                if isinstance(block, McpToolResultBlock)
            }
            for block in message.content:
                if block.type == "tool_use":
                    items.append(
                        {
                            "type": "function_call",
                            "call_id": block.id,
                            "name": block.name,
                            "arguments": json.dumps(block.input),
                        }
                    )
                elif block.type == "tool_result":
                    items.append(
                        {
                            "type": "function_call_output",
                            "call_id": block.tool_use_id,
                            "output": block.text,
                        }
                    )
                elif isinstance(block, McpToolUseBlock):
                    result = results.get(block.id)
                    items.append(
                        {
                            "type": "mcp_call",
                            "id": block.id,
                            "server_label": block.server_name,
                            "name": block.name,
                            "arguments": json.dumps(block.input),
                            "output": result.text if result and not result.is_error else None,
                            "error": result.text if result and result.is_error else None,
                        }
                    )
        tools: list[dict[str, Any]] = [
            {
                "type": "function",
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.input_schema,
            }
            for tool in body.tools or []
        ]
        for position, server in enumerate(body.mcp_servers or []):
            tools.append(await self._mcp_server_tool(server, position))
        choice: Any = None
        if body.tool_choice is not None:
            kind = body.tool_choice.type
            choice = (
                {"type": "function", "name": body.tool_choice.name}
                if kind == "tool"
                else {"auto": "auto", "any": "required", "none": "none"}[kind]
            )
        restated = {
            "model": body.model,
            "input": items,
            "tools": tools,
            "tool_choice": choice,
            "max_output_tokens": body.max_tokens,
            "parallel_tool_calls": not (
                body.tool_choice is not None and body.tool_choice.disable_parallel_tool_use
            ),
            "temperature": body.temperature,
            "top_p": body.top_p,
            "store": False,
        }
        if body.model != self.responses.served_model_name:
            raise OpenAIError(404, f"model: {body.model}")
        run = await self._run(restated)
        message_id = f"msg_{uuid.uuid4().hex}"
        if body.stream:
            events = run.events()
            first = await _first_generation_event(events)
            stream = _anthropic_stream(run, events, first, message_id, body.model)
            return StreamingResponse(stream, media_type="text/event-stream")
        await _drain(request, run)
        return JSONResponse(
            {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": body.model,
                "content": _anthropic_blocks(run.output),
                "stop_reason": _stop_reason(run),
                "stop_sequence": None,
                "usage": {"input_tokens": run.input_tokens, "output_tokens": run.output_tokens},
            },
            headers={"x-request-id": message_id},
        )

    async def _mcp_server_tool(self, server: Any, position: int) -> dict[str, Any]:
        """An Anthropic ``mcp_servers`` entry as a Responses ``mcp`` tool."""
        tool: dict[str, Any] = {
            "type": "mcp",
            "server_label": server.name,
            "require_approval": "never",  # Anthropic's connector has no approval step
        }
        configuration = server.tool_configuration
        if configuration is not None:
            if configuration.enabled is False:
                tool["allowed_tools"] = []
            elif configuration.allowed_tools is not None:
                tool["allowed_tools"] = configuration.allowed_tools
        tools = self.responses.tools
        configured = False
        if tools is not None:
            try:
                await tools.list_tools(server.name)
                configured = True
            except ToolServiceError as exc:
                if exc.http_status != 400:
                    raise OpenAIError(exc.http_status, exc.message) from exc
        if not configured:
            if not server.url:
                raise invalid_request(
                    f"mcp_servers.{position}: no MCP server is configured as {server.name!r}, "
                    "and no url is given"
                )
            tool["server_url"] = server.url
            if server.authorization_token:
                tool["headers"] = {"Authorization": f"Bearer {server.authorization_token}"}
        return tool


# -- running -------------------------------------------------------------------------------------


async def _drain(request: Request, run: ResponseRun) -> None:
    async def consume() -> None:
        async for _ in run.events():
            pass

    try:
        await until_disconnected(request, consume())
    except GENERATION_FAILURES as exc:
        raise openai_error_for(exc) from exc


_PRELUDE = {"response.created", "response.in_progress"}


async def _first_generation_event(events: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events up to the first that follows the start of a generation (an engine or tool
    service failure before it is an HTTP error)."""
    buffered: list[dict[str, Any]] = []
    try:
        async for event in events:
            buffered.append(event)
            item = event.get("item")
            if (
                event["type"] not in _PRELUDE
                and not (isinstance(item, dict) and item.get("type") == "mcp_list_tools")
                and not event["type"].startswith("response.mcp_list_tools")
            ):
                break
    except GENERATION_FAILURES as exc:
        raise openai_error_for(exc) from exc
    return buffered


async def _all_events(
    first: list[dict[str, Any]], events: AsyncIterator[dict[str, Any]]
) -> AsyncIterator[dict[str, Any]]:
    for event in first:
        yield event
    async for event in events:
        yield event


# -- Chat Completions shapes ---------------------------------------------------------------------


def _mcp_calls(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "id": item["id"],
            "server_label": item["server_label"],
            "name": item["name"],
            "arguments": item["arguments"],
            "output": item["output"],
            "error": item["error"],
        }
        for item in output
        if item["type"] == "mcp_call"
    ]


def _function_calls(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        for item in output
        if item["type"] == "function_call"
    ]


def _finish_reason(run: ResponseRun) -> str:
    if any(item["type"] == "function_call" for item in run.output):
        return "tool_calls"
    return "length" if run.status == "incomplete" else "stop"


def _chat_message(run: ResponseRun) -> tuple[dict[str, Any], str]:
    text = run.response()["output_text"]
    calls = _function_calls(run.output)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text if text or not calls else None,
        "tool_calls": calls or None,
        "mcp_calls": _mcp_calls(run.output),
    }
    return message, _finish_reason(run)


def _chat_usage(run: ResponseRun) -> dict[str, int]:
    return {
        "prompt_tokens": run.input_tokens,
        "completion_tokens": run.output_tokens,
        "total_tokens": run.input_tokens + run.output_tokens,
    }


async def _chat_stream(
    run: ResponseRun,
    events: AsyncIterator[dict[str, Any]],
    first: list[dict[str, Any]],
    chat_id: str,
    created: int,
    body: ChatCompletionRequest,
) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        payload = {
            "id": chat_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    yield chunk({"role": "assistant", "content": ""})
    calls = 0
    try:
        async for event in _all_events(first, events):
            if event["type"] == "response.output_text.delta":
                yield chunk({"content": event["delta"]})
            elif event["type"] == "response.output_item.done":
                item = event["item"]
                if item["type"] == "function_call":
                    yield chunk(
                        {
                            "tool_calls": [
                                {
                                    "index": calls,
                                    "id": item["call_id"],
                                    "type": "function",
                                    "function": {
                                        "name": item["name"],
                                        "arguments": item["arguments"],
                                    },
                                }
                            ]
                        }
                    )
                    calls += 1
                elif item["type"] == "mcp_call":
                    yield chunk({"mcp_calls": _mcp_calls([item])})
    except GENERATION_FAILURES as exc:
        error = openai_error_for(exc)
        yield f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n".encode()
        return
    yield chunk({}, _finish_reason(run))
    if body.include_usage:
        usage = {
            "id": chat_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": [],
            "usage": _chat_usage(run),
        }
        yield b"data: " + json.dumps(usage).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


# -- Anthropic shapes ----------------------------------------------------------------------------


def _mcp_blocks(item: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        arguments = json.loads(item["arguments"]) if item["arguments"] else {}
    except json.JSONDecodeError:
        arguments = {}
    failed = item["error"] is not None
    return [
        {
            "type": "mcp_tool_use",
            "id": item["id"],
            "name": item["name"],
            "server_name": item["server_label"],
            "input": arguments,
        },
        {
            "type": "mcp_tool_result",
            "tool_use_id": item["id"],
            "is_error": failed,
            "content": [
                {"type": "text", "text": item["error"] if failed else item["output"] or ""}
            ],
        },
    ]


def _tool_use_block(item: dict[str, Any]) -> dict[str, Any]:
    try:
        arguments = json.loads(item["arguments"]) if item["arguments"] else {}
    except json.JSONDecodeError:
        arguments = {}
    return {"type": "tool_use", "id": item["call_id"], "name": item["name"], "input": arguments}


def _anthropic_blocks(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for item in output:
        if item["type"] == "mcp_call":
            blocks.extend(_mcp_blocks(item))
        elif item["type"] == "message":
            text = "".join(part["text"] for part in item["content"])
            if text:
                blocks.append({"type": "text", "text": text})
        elif item["type"] == "function_call":
            blocks.append(_tool_use_block(item))
    return blocks


def _stop_reason(run: ResponseRun) -> str:
    if any(item["type"] == "function_call" for item in run.output):
        return "tool_use"
    return "max_tokens" if run.status == "incomplete" else "end_turn"


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()


async def _anthropic_stream(
    run: ResponseRun,
    events: AsyncIterator[dict[str, Any]],
    first: list[dict[str, Any]],
    message_id: str,
    model: str,
) -> AsyncIterator[bytes]:
    opening = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }
    yield _sse("message_start", {"message": opening})
    yield _sse("ping", {})
    index = 0
    text_open = False
    try:
        async for event in _all_events(first, events):
            kind = event["type"]
            if kind == "response.output_text.delta":
                if not text_open:
                    yield _sse(
                        "content_block_start",
                        {"index": index, "content_block": {"type": "text", "text": ""}},
                    )
                    text_open = True
                yield _sse(
                    "content_block_delta",
                    {"index": index, "delta": {"type": "text_delta", "text": event["delta"]}},
                )
            elif kind == "response.output_item.done":
                item = event["item"]
                if item["type"] == "message" and text_open:
                    yield _sse("content_block_stop", {"index": index})
                    index += 1
                    text_open = False
                    continue
                blocks = (
                    _mcp_blocks(item)
                    if item["type"] == "mcp_call"
                    else [_tool_use_block(item)]
                    if item["type"] == "function_call"
                    else []
                )
                for block in blocks:
                    yield _sse("content_block_start", {"index": index, "content_block": block})
                    yield _sse("content_block_stop", {"index": index})
                    index += 1
    except GENERATION_FAILURES as exc:
        yield _sse("error", openai_error_for(exc).anthropic_body())
        return
    if text_open:
        yield _sse("content_block_stop", {"index": index})
    yield _sse(
        "message_delta",
        {
            "delta": {"stop_reason": _stop_reason(run), "stop_sequence": None},
            "usage": {"input_tokens": run.input_tokens, "output_tokens": run.output_tokens},
        },
    )
    yield _sse("message_stop", {})
