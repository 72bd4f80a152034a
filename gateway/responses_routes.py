"""``POST /v1/responses`` and ``GET /v1/responses/{id}``: OpenAI's Responses API.

The handler settles everything that can be refused before the response starts (the model,
``previous_response_id``, the tools and their listing, ``tool_choice``, ``text.format``)
and answers those problems with OpenAI's error JSON; then :class:`~gateway.responses_loop.
ResponseRun` runs the loop. Streamed: ``event: TYPE`` / ``data: JSON`` server-sent events,
the first once the first generation started (so an unavailable engine is still a 503), an
``error`` event then ``response.failed`` if it fails later. A stored response (``store``,
the default) keeps its conversation for ``previous_response_id``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import Counter

from gateway.admission import GatewayBusy
from gateway.chat import ChatFormat, ToolChoice, check_tool_request
from gateway.engine_client import EngineError
from gateway.errors import OpenAIError, invalid_request
from gateway.generation import ContextLengthError, Generator
from gateway.harmony import HarmonyInputError
from gateway.openai_routes import openai_error_for
from gateway.response_store import ResponseStore
from gateway.responses_api import (
    FunctionChoice,
    FunctionTool,
    McpChoice,
    McpTool,
    ResponsesRequest,
)
from gateway.responses_loop import (
    BUILTIN_LABEL,
    ListedServer,
    ResolvedTool,
    ResponseRun,
    RunPlan,
    new_id,
)
from gateway.routing import NoReplicaAvailable
from gateway.serving import until_disconnected
from gateway.structured import ConstraintError, check_constraint
from gateway.tokenization import TemplateError
from gateway.tool_calls import ToolSpec
from gateway.tool_client import ToolClient, ToolServiceError
from switchyard.log import request_id_var
from switchyard.v1 import common_pb2

logger = logging.getLogger(__name__)

GENERATION_FAILURES = (
    ContextLengthError,
    GatewayBusy,
    NoReplicaAvailable,
    EngineError,
    TemplateError,
    HarmonyInputError,
    ConstraintError,
)


class ResponsesRoutes:
    def __init__(
        self,
        generator: Generator,
        chat: ChatFormat,
        served_model_name: str,
        tools: ToolClient | None,
        store: ResponseStore,
        *,
        allow_outbound_mcp: bool,
        max_iterations: int,
        tool_calls: Counter | None = None,
    ) -> None:
        self.tool_calls = tool_calls
        self.generator = generator
        self.chat = chat
        self.served_model_name = served_model_name
        self.tools = tools
        self.store = store
        self.allow_outbound_mcp = allow_outbound_mcp
        self.max_iterations = max_iterations

    async def create(self, body: ResponsesRequest, request: Request) -> Response:
        plan = await self.plan(body)
        request_id_var.set(plan.response_id)
        run = ResponseRun(plan, self.generator, self.chat, self.tools, self.tool_calls)
        events = run.events()
        headers = {"x-request-id": plan.response_id}
        if body.stream:
            # Wait for the first generation to start (or fail) before answering 200.
            buffered: list[dict[str, Any]] = []
            try:
                async for event in events:
                    buffered.append(event)
                    if _started_generating(event):
                        break
            except GENERATION_FAILURES as exc:
                await events.aclose()
                raise openai_error_for(exc) from exc
            stream = self._stream(run, buffered, events, body.store)
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        try:
            async with aclosing(events):
                await until_disconnected(request, _drain(events))
        except GENERATION_FAILURES as exc:
            raise openai_error_for(exc) from exc
        response = run.response()
        if body.store:
            await self._save(run)
        return JSONResponse(response, headers=headers)

    async def retrieve(self, response_id: str) -> JSONResponse:
        stored = await self._stored(response_id)
        if stored is None:
            raise _not_found(response_id)
        return JSONResponse(stored["response"])

    async def _stored(self, response_id: str) -> dict[str, Any] | None:
        try:
            return await self.store.get(response_id)
        except Exception as exc:  # Redis down: the caller's request cannot be served now
            logger.warning("response store unavailable", extra={"error": str(exc)})
            raise OpenAIError(
                503, "the response store is unavailable", code="response_store_unavailable"
            ) from exc

    async def _stream(
        self,
        run: ResponseRun,
        buffered: list[dict[str, Any]],
        events: AsyncIterator[dict[str, Any]],
        store: bool,
    ) -> AsyncIterator[bytes]:
        async with aclosing(events):  # type: ignore[type-var]
            yield b"".join(_sse(event) for event in buffered)
            try:
                async for event in events:
                    yield _sse(event)
            except GENERATION_FAILURES as exc:
                error = openai_error_for(exc)
                logger.warning("response failed mid-stream", extra={"error": error.message})
                run.status = "failed"
                run.error = {"code": error.code or "server_error", "message": error.message}
                yield _sse(
                    run._event("error", code=error.code, message=error.message, param=error.param)
                )
                yield _sse(run._event("response.failed", response=run.response()))
                return
        if store:
            await self._save(run)

    async def _save(self, run: ResponseRun) -> None:
        plan = run.plan
        record = {
            "response": run.response(),
            "conversation": [*plan.conversation, *run.output],
        }
        try:
            await self.store.put(plan.response_id, record)
        except Exception as exc:  # a store outage loses continuity, not the answer
            logger.warning("could not store the response", extra={"error": str(exc)})

    # -- the plan --------------------------------------------------------------------------------

    async def plan(self, body: ResponsesRequest) -> RunPlan:
        """Everything the loop needs, checked: raises ``OpenAIError`` (400/403/404/503) for
        what the request cannot have, before anything is generated."""
        if body.model != self.served_model_name:
            raise OpenAIError(
                404,
                f"The model `{body.model}` does not exist.",
                param="model",
                code="model_not_found",
            )
        conversation: list[dict[str, Any]] = []
        if body.previous_response_id:
            stored = await self._stored(body.previous_response_id)
            if stored is None:
                raise _not_found(body.previous_response_id, param="previous_response_id")
            conversation = stored["conversation"]
        if isinstance(body.input, str):
            input_items = [{"type": "message", "role": "user", "content": body.input}]
        else:
            input_items = [item.model_dump(mode="json", exclude_none=True) for item in body.input]
        if not input_items:
            raise invalid_request("input must not be empty", param="input")
        for position, item in enumerate(input_items):
            content = item.get("content")
            for part in content if isinstance(content, list) else []:
                if part.get("type") not in ("input_text", "output_text", "text"):
                    raise invalid_request(
                        f"content parts of type '{part.get('type')}' are not supported by "
                        "this model",
                        param=f"input[{position}].content",
                    )
        approvals = _approvals(input_items, conversation)
        tools, listed = await self._resolve_tools(body, conversation)
        choice = _tool_choice(body, tools)
        specs = [tool.spec for tool in tools.values()]
        text_constraint = _text_constraint(body)
        try:
            check_tool_request(specs, choice)
        except ConstraintError as exc:
            raise invalid_request(str(exc), param=exc.param) from exc
        sampling = common_pb2.SamplingParams(
            n=1,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
        )
        echo = {
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "max_tool_calls": body.max_tool_calls,
            "metadata": body.metadata or {},
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id,
            "store": body.store,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "text": body.text.model_dump(mode="json", by_alias=True, exclude_none=True)
            if body.text
            else {"format": {"type": "text"}},
            "tool_choice": _echo_choice(body),
            "tools": [tool.model_dump(mode="json", exclude_none=True) for tool in body.tools],
            "user": body.user,
        }
        return RunPlan(
            response_id=new_id("resp"),
            model=body.model,
            conversation=[*conversation, *input_items],
            input_items=input_items,
            instructions=body.instructions,
            tools=tools,
            listed=listed,
            first_choice=choice,
            text_constraint=text_constraint,
            approvals=approvals,
            sampling=sampling,
            max_output_tokens=body.max_output_tokens,
            max_tool_calls=body.max_tool_calls,
            max_iterations=self.max_iterations,
            parallel_tool_calls=body.parallel_tool_calls,
            echo=echo,
        )

    async def _resolve_tools(
        self, body: ResponsesRequest, conversation: list[dict[str, Any]]
    ) -> tuple[dict[str, ResolvedTool], list[ListedServer]]:
        tools: dict[str, ResolvedTool] = {}
        listed: list[ListedServer] = []
        already_listed = {
            item.get("server_label")
            for item in conversation
            if item.get("type") == "mcp_list_tools"
        }
        for position, tool in enumerate(body.tools):
            if isinstance(tool, FunctionTool):
                spec = ToolSpec(tool.name, tool.description or "", tool.parameters)
                tools[tool.name] = ResolvedTool(spec, "function")
                continue
            assert isinstance(tool, McpTool)
            described = await self._list_server(tool, position)
            allowed = tool.allowed_names()
            offered = [
                entry for entry in described if allowed is None or entry.server_tool_name in allowed
            ]
            for entry in offered:
                spec = ToolSpec(entry.name, entry.description, entry.input_schema)
                tools[entry.name] = ResolvedTool(
                    spec,
                    "mcp",
                    server_label=tool.server_label,
                    server_tool_name=entry.server_tool_name,
                    server_url=tool.server_url or "",
                    headers=tool.headers or {},
                    needs_approval=_needs_approval(tool, entry.server_tool_name),
                )
            if tool.server_label not in already_listed:
                listed.append(
                    ListedServer(
                        tool.server_label,
                        [
                            {
                                "name": entry.server_tool_name,
                                "description": entry.description,
                                "input_schema": entry.input_schema,
                                "annotations": None,
                            }
                            for entry in offered
                        ],
                    )
                )
        return tools, listed

    async def _list_server(self, tool: McpTool, position: int) -> list[Any]:
        param = f"tools[{position}]"
        if self.tools is None:
            raise invalid_request(
                "mcp tools need the tool service, and this gateway has none configured", param
            )
        if tool.server_url and not self.allow_outbound_mcp:
            raise OpenAIError(
                403,
                "this gateway does not connect to MCP servers by server_url; name a configured "
                "server by its server_label",
                param=f"{param}.server_url",
                code="outbound_mcp_disabled",
            )
        try:
            return await self.tools.list_tools(
                tool.server_label,
                server_url=tool.server_url or "",
                headers=tool.headers or {},
            )
        except ToolServiceError as exc:
            status = exc.http_status
            raise OpenAIError(status, exc.message, param=param) from exc


def build_responses_router(routes: ResponsesRoutes) -> APIRouter:
    router = APIRouter(prefix="/v1")
    router.add_api_route("/responses", routes.create, methods=["POST"], response_model=None)
    router.add_api_route(
        "/responses/{response_id}", routes.retrieve, methods=["GET"], response_model=None
    )
    return router


# -- helpers ---------------------------------------------------------------------------------


def _not_found(response_id: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(
        404, f"Response with id '{response_id}' not found.", param=param, code="response_not_found"
    )


_PRELUDE = {
    "response.created",
    "response.in_progress",
    "response.mcp_list_tools.in_progress",
    "response.mcp_list_tools.completed",
}


def _started_generating(event: dict[str, Any]) -> bool:
    """Whether ``event`` comes after the first generation started (the prelude, and the
    tool listings, come before it)."""
    if event["type"] in _PRELUDE:
        return False
    item = event.get("item")
    return not (isinstance(item, dict) and item.get("type") == "mcp_list_tools")


async def _drain(events: AsyncIterator[dict[str, Any]]) -> None:
    async for _ in events:
        pass


def _sse(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


def _needs_approval(tool: McpTool, name: str) -> bool:
    """OpenAI's ``require_approval``: "always", "never", or ``{"always"|"never":
    {"tool_names": [...]}}``. Unset: servers reached by URL ask, configured servers (the
    operator vouched for them) and platform tools do not."""
    setting = tool.require_approval
    if setting is None:
        return bool(tool.server_url)
    if isinstance(setting, str):
        return setting == "always"
    for mode in ("always", "never"):
        names = (setting.get(mode) or {}).get("tool_names")
        if names is not None and name in names:
            return mode == "always"
    return "never" not in setting


def _approvals(
    input_items: list[dict[str, Any]], conversation: list[dict[str, Any]]
) -> list[tuple[dict[str, Any], bool]]:
    requests = {
        item["id"]: item for item in conversation if item.get("type") == "mcp_approval_request"
    }
    found = []
    for item in input_items:
        if item.get("type") != "mcp_approval_response":
            continue
        request = requests.get(item["approval_request_id"])
        if request is None:
            raise invalid_request(
                f"no mcp_approval_request {item['approval_request_id']!r} in the conversation "
                "(continue the response that asked, with previous_response_id)",
                param="input",
            )
        found.append((request, bool(item["approve"])))
    return found


def _tool_choice(body: ResponsesRequest, tools: dict[str, ResolvedTool]) -> ToolChoice:
    choice = body.tool_choice
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(choice, str):
        return ToolChoice(choice)
    if isinstance(choice, FunctionChoice):
        return ToolChoice("named", choice.name)
    assert isinstance(choice, McpChoice)
    offered = [
        name
        for name, tool in tools.items()
        if tool.kind == "mcp" and tool.server_label == choice.server_label
    ]
    if not offered:
        raise invalid_request(
            f"tool_choice names the MCP server {choice.server_label!r}, which no mcp tool of "
            "this request offers",
            param="tool_choice",
        )
    if choice.name is None:
        if len(offered) == 1:
            return ToolChoice("named", offered[0])
        raise invalid_request(
            f"tool_choice must name one tool of {choice.server_label!r} ({len(offered)} offered)",
            param="tool_choice.name",
        )
    wanted = choice.name if choice.server_label == BUILTIN_LABEL else None
    for name in offered:
        tool = tools[name]
        if tool.server_tool_name == choice.name or name == wanted:
            return ToolChoice("named", name)
    raise invalid_request(
        f"tool_choice names {choice.name!r}, which {choice.server_label!r} does not offer",
        param="tool_choice.name",
    )


def _echo_choice(body: ResponsesRequest) -> Any:
    choice = body.tool_choice
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice
    return choice.model_dump(mode="json", exclude_none=True)


def _text_constraint(body: ResponsesRequest) -> common_pb2.StructuredOutput | None:
    text_format = body.text.format if body.text else None
    if text_format is None or text_format.type == "text":
        return None
    if text_format.type == "json_object":
        constraint = common_pb2.StructuredOutput(json_object=True)
    else:
        if text_format.schema_ is None:
            raise invalid_request(
                "text.format of type json_schema needs a schema", param="text.format.schema"
            )
        constraint = common_pb2.StructuredOutput(json_schema=json.dumps(text_format.schema_))
    try:
        check_constraint(constraint, "text.format")
    except ConstraintError as exc:
        raise invalid_request(str(exc), param=exc.param) from exc
    return constraint
