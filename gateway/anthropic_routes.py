"""The Anthropic Messages API: ``POST /v1/messages``.

The body's system prompt, messages (text, tool_use and tool_result blocks) and tools become
an OpenAI-shaped conversation for the model's chat template (or Harmony), ``tool_choice``
``any``/``tool`` become a forced-call grammar, and the output parser's content and tool calls
become text and tool_use blocks. Streaming follows Anthropic's event sequence::

    message_start, ping,
    (content_block_start, content_block_delta*, content_block_stop)*   text_delta / input_json_delta
    message_delta (stop_reason, usage), message_stop

Like the OpenAI endpoints, a stream is answered only once the first output has arrived, so a
request that fails before (bad constraint, no replica) gets its HTTP status; a later failure
ends the stream with an ``error`` event. Reasoning (Harmony's analysis channel) is not
returned on this API.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.anthropic_api import (
    Base64ImageSource,
    ErrorResponse,
    ImageBlock,
    Message,
    MessagesRequest,
    OutputTextBlock,
    OutputToolUseBlock,
    StopReason,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
)
from gateway.chat import ChatFormat, ToolChoice, check_tool_request
from gateway.errors import AnthropicError, ApiError
from gateway.generation import GenerationSpec, Generator, SampleDelta
from gateway.harmony import HarmonyInputError
from gateway.lora_routes import AdapterCatalog
from gateway.metrics import GatewayMetrics
from gateway.multimodal import ImageRef, ImageSupport
from gateway.openapi import GENERATION_ERRORS, error_responses
from gateway.serving import (
    GENERATION_FAILURES,
    failure_for,
    start_generation,
    until_disconnected,
)
from gateway.sse import EventStream, FinalEvents
from gateway.structured import ConstraintError, off_the_loop
from gateway.tokenization import TemplateError
from gateway.tool_calls import OutputParser, ToolSpec
from switchyard.log import request_id_var
from switchyard.v1 import common_pb2

logger = logging.getLogger(__name__)

ENDPOINT = "/v1/messages"


def anthropic_error_for(exc: Exception) -> AnthropicError:
    """The Anthropic error a failed generation is answered with."""
    return AnthropicError.of(failure_for(exc))


def _invalid_request(message: str) -> AnthropicError:
    return AnthropicError(400, message)


class AnthropicRoutes:
    """The Messages handler, bound to the generator and the model's chat format."""

    def __init__(
        self,
        generator: Generator,
        chat: ChatFormat,
        metrics: GatewayMetrics,
        served_model_name: str,
        catalog: AdapterCatalog | None = None,
        images: ImageSupport | None = None,
    ) -> None:
        self.generator = generator
        self.images = images or ImageSupport.text_only()
        self.chat = chat
        self.metrics = metrics
        self.served_model_name = served_model_name
        self.platform_chat: Any = None  # set when a tool service is configured
        self.catalog = catalog or AdapterCatalog(generator.router, served_model_name)

    async def messages(self, body: MessagesRequest, request: Request) -> Response:
        adapter = self.catalog.resolve(body.model, anthropic=True)
        if body.mcp_servers:  # the gateway runs these tools: gateway/platform_chat.py
            if self.platform_chat is None:
                raise _invalid_request("mcp_servers need a tool service")
            return await self.platform_chat.messages(body, request)  # type: ignore[no-any-return]
        request_id = f"msg_{uuid.uuid4().hex}"
        tools = [
            ToolSpec(tool.name, tool.description, tool.input_schema) for tool in body.tools or []
        ]
        choice, parallel = _tool_choice(body)
        image_refs: list[ImageRef] = []
        messages = _template_messages(body, image_refs)
        try:
            if image_refs:
                self.images.check(image_refs)  # before any work on a request we refuse
            if tools:
                await off_the_loop(check_tool_request, tools, choice)
            else:
                check_tool_request(tools, choice)
            prompt_ids = await self.chat.encode(messages, tools, choice, {})
            forced = self.chat.tool_constraint(tools, choice, parallel=parallel)
            prepared = None
            if image_refs:
                prepared = await self.images.prepare(prompt_ids, image_refs)
                prompt_ids = prepared.token_ids
        except (TemplateError, HarmonyInputError, ConstraintError, ApiError) as exc:
            raise anthropic_error_for(exc) from exc
        sampling = common_pb2.SamplingParams(
            n=1,
            temperature=body.temperature,
            top_p=body.top_p if body.top_p is not None else 1.0,
            top_k=body.top_k or 0,
            repetition_penalty=1.0,
            stop_token_ids=self.chat.stop_token_ids(),
        )
        spec = GenerationSpec(
            request_id=request_id,
            model=body.model,
            prompt_token_ids=prompt_ids,
            sampling=sampling,
            max_tokens=body.max_tokens,
            stop=list(body.stop_sequences or []),
            structured=forced,
            adapter=adapter,
        )
        if prepared is not None:
            spec.images, spec.media = prepared.images, prepared.media
        shape = _MessageShape(
            request_id,
            body.model,
            self.chat.output_parser(tools, choice, id_prefix="toolu_"),
            len(prompt_ids),
        )
        request_id_var.set(request_id)
        try:
            first, deltas = await start_generation(
                request,
                self.generator,
                spec,
                self.metrics,
                ENDPOINT,
                time.perf_counter(),
                # A stream's opening events are rendered while the engine computes.
                while_engine_computes=shape.opening_events if body.stream else None,
            )
        except ApiError as exc:
            raise AnthropicError.of(exc) from exc
        headers = {"x-request-id": request_id}
        if body.stream:
            return EventStream(self._events(first, deltas, shape), headers)
        try:
            await until_disconnected(request, _collect(shape, first, deltas))
        except GENERATION_FAILURES as exc:
            raise anthropic_error_for(exc) from exc
        finally:
            await deltas.aclose()
        self.metrics.generation_tokens.inc(shape.output_tokens)
        return Response(
            shape.message().model_dump_json(), media_type="application/json", headers=headers
        )

    async def _events(
        self, first: SampleDelta, deltas: AsyncIterator[SampleDelta], shape: _MessageShape
    ) -> AsyncIterator[bytes]:
        # Events that are ready together go out in one write: each write is a syscall and a
        # wakeup of the client, and the first text would otherwise wait behind three.
        async with aclosing(deltas):
            try:
                yield shape.opening_events() + _framed(shape.events(first))
                async for delta in deltas:
                    events = _framed(shape.events(delta))
                    if events:
                        yield events
            except GENERATION_FAILURES as exc:
                logger.warning("engine failed mid-stream", extra={"error": str(exc)})
                yield FinalEvents(_event("error", anthropic_error_for(exc).anthropic_body()))
                return
        yield FinalEvents(_framed(shape.closing_events()))
        self.metrics.generation_tokens.inc(shape.output_tokens)


def build_anthropic_router(routes: AnthropicRoutes) -> APIRouter:
    """``POST /v1/messages`` (the API-key middleware guards it, accepting ``x-api-key``)."""
    router = APIRouter(prefix="/v1", tags=["Anthropic"])
    router.add_api_route(
        "/messages",
        routes.messages,
        methods=["POST"],
        response_model=None,
        responses={
            200: {
                "model": Message,
                "description": "the message; with `stream` true, Anthropic's server-sent "
                "events (message_start ... message_stop)",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            **error_responses(ErrorResponse, GENERATION_ERRORS),
        },
    )
    return router


class _MessageShape:
    """Turns one sample's deltas into content blocks and stream events."""

    def __init__(
        self, message_id: str, model: str, parser: OutputParser, input_tokens: int
    ) -> None:
        self.message_id = message_id
        self.model = model
        self.parser = parser
        self.input_tokens = input_tokens
        self.output_tokens = 0
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None
        # Blocks in order; a tool_use block's input is held as JSON text until the end.
        self.blocks: list[OutputTextBlock | _ToolUse] = []
        self._open = False
        self._block_of_call: dict[int, int] = {}
        self._opening_events: bytes | None = None

    def opening_events(self) -> bytes:
        """A stream's first events, message_start and a ping, framed (rendered once)."""
        if self._opening_events is None:
            message = self.opening().model_dump(mode="json")
            self._opening_events = _event("message_start", {"message": message}) + _event(
                "ping", {}
            )
        return self._opening_events

    def opening(self) -> Message:
        return Message(
            id=self.message_id,
            model=self.model,
            content=[],
            usage=Usage(input_tokens=self.input_tokens, output_tokens=0),
        )

    def events(self, delta: SampleDelta) -> list[tuple[str, dict[str, Any]]]:
        self.output_tokens = delta.num_tokens
        parsed = self.parser.feed(delta.text, delta.token_ids)
        if delta.finish_reason is not None:
            parsed.extend(self.parser.finish())
            self.finish_reason = delta.finish_reason
            self.stop_sequence = delta.stop_string
        out: list[tuple[str, dict[str, Any]]] = []
        if parsed.content:
            if not (self._open and isinstance(self.blocks[-1], OutputTextBlock)):
                out.extend(self._start(OutputTextBlock(text="")))
            text_block = self.blocks[-1]
            assert isinstance(text_block, OutputTextBlock)
            text_block.text += parsed.content
            out.append(self._delta({"type": "text_delta", "text": parsed.content}))
        for part in parsed.tool_calls:
            if part.id is not None:
                self._block_of_call[part.index] = len(self.blocks)
                out.extend(self._start(_ToolUse(part.id, part.name or "")))
            elif part.arguments:
                call = self.blocks[self._block_of_call[part.index]]
                assert isinstance(call, _ToolUse)
                call.arguments += part.arguments
                out.append(
                    self._delta({"type": "input_json_delta", "partial_json": part.arguments})
                )
        return out

    def closing_events(self) -> list[tuple[str, dict[str, Any]]]:
        out = self._stop_open()
        out.append(
            (
                "message_delta",
                {
                    "delta": {
                        "stop_reason": self.stop_reason(),
                        "stop_sequence": self.stop_sequence,
                    },
                    "usage": {"output_tokens": self.output_tokens},
                },
            )
        )
        out.append(("message_stop", {}))
        return out

    def stop_reason(self) -> StopReason:
        if self.finish_reason == "length":
            return "max_tokens"
        if self.parser.num_tool_calls:
            return "tool_use"
        return "stop_sequence" if self.stop_sequence is not None else "end_turn"

    def message(self) -> Message:
        content: list[OutputTextBlock | OutputToolUseBlock] = [
            block if isinstance(block, OutputTextBlock) else block.output() for block in self.blocks
        ]
        return Message(
            id=self.message_id,
            model=self.model,
            content=content,
            stop_reason=self.stop_reason(),
            stop_sequence=self.stop_sequence,
            usage=Usage(input_tokens=self.input_tokens, output_tokens=self.output_tokens),
        )

    def _start(self, block: OutputTextBlock | _ToolUse) -> list[tuple[str, dict[str, Any]]]:
        out = self._stop_open()
        self.blocks.append(block)
        self._open = True
        shown = block.model_dump() if isinstance(block, OutputTextBlock) else block.opening()
        out.append(("content_block_start", {"index": len(self.blocks) - 1, "content_block": shown}))
        return out

    def _stop_open(self) -> list[tuple[str, dict[str, Any]]]:
        if not self._open:
            return []
        self._open = False
        return [("content_block_stop", {"index": len(self.blocks) - 1})]

    def _delta(self, delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return ("content_block_delta", {"index": len(self.blocks) - 1, "delta": delta})


class _ToolUse:
    """A tool_use block while its input streams in as JSON text."""

    __slots__ = ("arguments", "id", "name")

    def __init__(self, call_id: str, name: str) -> None:
        self.id = call_id
        self.name = name
        self.arguments = ""

    def opening(self) -> dict[str, Any]:
        return {"type": "tool_use", "id": self.id, "name": self.name, "input": {}}

    def output(self) -> OutputToolUseBlock:
        """The finished block; input that is not a JSON object (an output cut off by
        max_tokens) is given as ``{}``."""
        try:
            value = json.loads(self.arguments or "{}")
        except json.JSONDecodeError:
            value = {}
        return OutputToolUseBlock(
            id=self.id, name=self.name, input=value if isinstance(value, dict) else {}
        )


async def _collect(
    shape: _MessageShape, first: SampleDelta, rest: AsyncIterator[SampleDelta]
) -> None:
    shape.events(first)
    async for delta in rest:
        shape.events(delta)


def _event(name: str, data: dict[str, Any]) -> bytes:
    # orjson writes compact UTF-8 bytes directly: this runs for every streamed delta.
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **data}) + b"\n\n"


def _framed(events: list[tuple[str, dict[str, Any]]]) -> bytes:
    return b"".join(_event(name, data) for name, data in events)


def _tool_choice(body: MessagesRequest) -> tuple[ToolChoice, bool]:
    """The tool choice and whether parallel calls are allowed (Anthropic's default: auto)."""
    choice = body.tool_choice
    if choice is None:
        return ToolChoice("auto" if body.tools else "none"), True
    parallel = not choice.disable_parallel_tool_use
    if choice.type == "tool":
        if not choice.name:
            raise _invalid_request("tool_choice.name: Field required for tool_choice type 'tool'")
        return ToolChoice("named", choice.name), parallel
    mode = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    return ToolChoice(mode), parallel  # type: ignore[arg-type]


def _template_messages(body: MessagesRequest, image_refs: list[ImageRef]) -> list[dict[str, Any]]:
    """The conversation in the OpenAI shape chat templates take: tool_use blocks become an
    assistant message's tool_calls, tool_result blocks become tool messages. Each
    tool_result must answer a tool_use of the message before it (400 otherwise). A user
    message with image blocks becomes a list of text and ``{"type": "image"}`` parts, each
    image's reference added to ``image_refs``."""
    rendered: list[dict[str, Any]] = []
    if body.system_text:
        rendered.append({"role": "system", "content": body.system_text})
    previous_calls: set[str] = set()
    for position, message in enumerate(body.messages):
        blocks = (
            [TextBlock(type="text", text=message.content)]
            if isinstance(message.content, str)
            else message.content
        )
        text = "".join(block.text for block in blocks if isinstance(block, TextBlock))
        calls = [block for block in blocks if isinstance(block, ToolUseBlock)]
        results = [block for block in blocks if isinstance(block, ToolResultBlock)]
        if message.role == "assistant":
            if any(isinstance(block, ImageBlock) for block in blocks):
                raise _invalid_request(f"messages.{position}: image blocks belong in user messages")
            if results:
                raise _invalid_request(
                    f"messages.{position}: tool_result blocks belong in user messages"
                )
            entry: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                entry["tool_calls"] = [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.input},
                    }
                    for call in calls
                ]
            rendered.append(entry)
            previous_calls = {call.id for call in calls}
            continue
        if calls:
            raise _invalid_request(
                f"messages.{position}: tool_use blocks belong in assistant messages"
            )
        unknown = [
            result.tool_use_id for result in results if result.tool_use_id not in previous_calls
        ]
        if unknown:
            raise _invalid_request(
                f"messages.{position}: unexpected `tool_use_id` found in `tool_result` blocks: "
                f"{', '.join(unknown)}. Each `tool_result` block must have a corresponding "
                "`tool_use` block in the previous message."
            )
        for result in results:
            content = result.text
            rendered.append(
                {
                    "role": "tool",
                    "tool_call_id": result.tool_use_id,
                    "content": f"Error: {content}" if result.is_error else content,
                }
            )
        images = [block for block in blocks if isinstance(block, ImageBlock)]
        if images:
            parts: list[dict[str, Any]] = []
            for index, block in enumerate(blocks):
                if isinstance(block, TextBlock):
                    parts.append({"type": "text", "text": block.text})
                elif isinstance(block, ImageBlock):
                    param = f"messages.{position}.content.{index}.source"
                    source = block.source
                    if isinstance(source, Base64ImageSource):
                        ref = ImageRef(param, base64_data=source.data, media_type=source.media_type)
                    else:
                        ref = ImageRef(param, url=source.url)
                    image_refs.append(ref)
                    parts.append({"type": "image"})
            rendered.append({"role": "user", "content": parts})
        elif text or not results:
            rendered.append({"role": "user", "content": text})
        previous_calls = set()
    return rendered
