"""The OpenAI endpoints: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``.

Each handler turns the validated body into a :class:`GenerationSpec` (chat template and
tokenization for chat), runs it through the :class:`Generator`, and shapes the sample
deltas into OpenAI's JSON, or into server-sent events when ``stream`` is set:
``data: {json}\\n\\n`` per chunk, a usage chunk when ``stream_options.include_usage`` is set,
then ``data: [DONE]\\n\\n``.

A streamed request is answered only once its first output has arrived, so that anything
that fails before it (no replica, a rejected request) still gets its proper HTTP status.
After that, a failure ends the stream with an error event.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import orjson
import pydantic_core
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from gateway.chat import ChatFormat, ToolChoice, check_tool_request
from gateway.errors import ApiError, OpenAIError, invalid_request
from gateway.generation import GenerationSpec, Generator, SampleDelta
from gateway.harmony import HarmonyInputError
from gateway.lora_routes import AdapterCatalog
from gateway.metrics import GatewayMetrics
from gateway.multimodal import ImageRef, ImageSupport
from gateway.openai_api import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ErrorResponse,
    FunctionCall,
    FunctionCallDelta,
    ModelCard,
    ModelList,
    SamplingRequest,
    TokenLogprob,
    ToolCall,
    ToolCallChunk,
    TopLogprob,
    Usage,
)
from gateway.openapi import GENERATION_ERRORS, error_responses
from gateway.serving import (
    GENERATION_FAILURES,
    failure_for,
    start_generation,
    until_disconnected,
)
from gateway.sse import EventStream, FinalEvents
from gateway.structured import (
    ConstraintError,
    check_constraint,
    make_constraint,
    off_the_loop,
)
from gateway.tokenization import ModelTokenizer, TemplateError
from gateway.tool_calls import OutputParser, ParsedDelta, ToolSpec
from switchyard.log import request_id_var
from switchyard.v1 import common_pb2

logger = logging.getLogger(__name__)

T = TypeVar("T")


def openai_error_for(exc: Exception) -> OpenAIError:
    """The OpenAI error a failed generation is answered with."""
    return OpenAIError.of(failure_for(exc))


class OpenAIRoutes:
    """The handlers, bound to the generator and the deployment's limits."""

    def __init__(
        self,
        generator: Generator,
        chat: ChatFormat,
        metrics: GatewayMetrics,
        served_model_name: str,
        max_n: int,
        catalog: AdapterCatalog | None = None,
        images: ImageSupport | None = None,
    ) -> None:
        self.generator = generator
        self.images = images or ImageSupport.text_only()
        self.catalog = catalog or AdapterCatalog(generator.router, served_model_name)
        self.chat = chat
        self.tokenizer: ModelTokenizer = generator.tokenizer
        self.metrics = metrics
        self.served_model_name = served_model_name
        self.max_n = max_n
        self.created = int(time.time())
        self.platform_chat: Any = None  # set when a tool service is configured

    # -- /v1/models --------------------------------------------------------------------------

    async def list_models(self) -> ModelList:
        card = ModelCard(
            id=self.served_model_name,
            created=self.created,
            max_model_len=self.generator.max_model_len(),
        )
        return ModelList(data=[card, *self.catalog.cards(self.created)])

    async def retrieve_model(self, model_id: str) -> ModelCard:
        """``GET /v1/models/{model_id}`` (the ``openai`` client's ``models.retrieve``): the
        base model or one of its LoRA adapters."""
        adapter_card = next((c for c in self.catalog.cards(self.created) if c.id == model_id), None)
        if adapter_card is not None:
            return adapter_card
        if model_id != self.served_model_name:
            raise _model_not_found(model_id)
        return ModelCard(
            id=self.served_model_name,
            created=self.created,
            max_model_len=self.generator.max_model_len(),
        )

    # -- /v1/chat/completions ----------------------------------------------------------------

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check_common(body)
        if body.has_platform_tools:  # the gateway runs these tools: gateway/platform_chat.py
            if self.platform_chat is None:
                raise invalid_request("mcp tools need a tool service", param="tools")
            return await self.platform_chat.chat(body, request)  # type: ignore[no-any-return]
        if body.top_logprobs is not None and not body.logprobs:
            raise invalid_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        request_id = _new_id("chatcmpl")
        tools = [
            ToolSpec(tool.function.name, tool.function.description, tool.function.parameters)
            for tool in body.tools or []
        ]
        choice = _tool_choice(body)
        image_refs: list[ImageRef] = []
        messages = [
            _template_message(message, position, image_refs)
            for position, message in enumerate(body.messages)
        ]
        try:
            if image_refs:
                self.images.check(image_refs)  # before any work on a request we refuse
            if tools:
                await off_the_loop(check_tool_request, tools, choice)
            else:
                check_tool_request(tools, choice)
            prompt_ids = await self.chat.encode(
                messages,
                tools,
                choice,
                body.chat_template_kwargs,
                reasoning_effort=body.reasoning_effort,
            )
            forced = self.chat.tool_constraint(tools, choice, parallel=body.parallel_tool_calls)
            prepared = None
            if image_refs:
                prepared = await self.images.prepare(prompt_ids, image_refs)
                prompt_ids = prepared.token_ids
        except (TemplateError, HarmonyInputError, ConstraintError, ApiError) as exc:
            raise openai_error_for(exc) from exc
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        spec = await self._spec(request_id, body, prompt_ids, body.output_limit, logprobs)
        if prepared is not None:
            spec.images, spec.media = prepared.images, prepared.media
        if forced is not None:
            if spec.structured is not None:
                raise invalid_request(
                    f"tool_choice {choice.mode!r} cannot be combined with another output "
                    "constraint (response_format, structured_outputs, guided_*)",
                    param="tool_choice",
                )
            spec.structured = forced
        spec.sampling.stop_token_ids.extend(self.chat.stop_token_ids())
        shape = _ChatShape(
            self.tokenizer,
            request_id,
            body.model,
            body.n,
            with_logprobs=logprobs is not None,
            parsers=[self.chat.output_parser(tools, choice) for _ in range(body.n)],
        )
        return await self._respond(request, spec, body, shape, "/v1/chat/completions")

    # -- /v1/completions ---------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check_common(body)
        if body.echo:
            raise invalid_request("echo is not supported", param="echo")
        if body.suffix:
            raise invalid_request("suffix is not supported", param="suffix")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise invalid_request(
                    "batched prompts are not supported; send one prompt per request", param="prompt"
                )
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = await self.tokenizer.encode_prompt(prompt)
        else:
            prompt_ids = [int(token_id) for token_id in prompt]  # type: ignore[arg-type]
            vocab_size = len(self.tokenizer.tokenizer)
            if any(not 0 <= token_id < vocab_size for token_id in prompt_ids):
                raise invalid_request(
                    f"prompt token ids must be in 0..{vocab_size - 1}", param="prompt"
                )
        if not prompt_ids:
            raise invalid_request("the prompt must not be empty", param="prompt")
        request_id = _new_id("cmpl")
        spec = await self._spec(request_id, body, prompt_ids, body.max_tokens, body.logprobs)
        shape = _CompletionShape(
            self.tokenizer, request_id, body.model, body.n, with_logprobs=body.logprobs is not None
        )
        return await self._respond(request, spec, body, shape, "/v1/completions")

    # -- shared --------------------------------------------------------------------------------

    def _check_common(self, body: SamplingRequest) -> None:
        self.catalog.resolve(body.model)  # a 404 unless the base model or a served adapter
        if body.n > self.max_n:
            raise invalid_request(f"n must be at most {self.max_n}, got {body.n}", param="n")
        if body.stream_options is not None and not body.stream:
            raise invalid_request(
                "stream_options is only allowed when stream is true", param="stream_options"
            )

    async def _spec(
        self,
        request_id: str,
        body: SamplingRequest,
        prompt_ids: list[int],
        max_tokens: int | None,
        logprobs: int | None,
    ) -> GenerationSpec:
        sampling = common_pb2.SamplingParams(
            n=body.n,
            min_tokens=body.min_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            seed=body.seed,
            stop_token_ids=body.stop_token_ids,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
        )
        if max_tokens is not None and body.min_tokens > max_tokens:
            raise invalid_request("min_tokens must not exceed max_tokens", param="min_tokens")
        constraint = _output_constraint(body)
        if constraint is not None:
            try:
                await off_the_loop(check_constraint, constraint[1], constraint[0])
            except ConstraintError as exc:
                raise openai_error_for(exc) from exc
        return GenerationSpec(
            request_id=request_id,
            model=body.model,
            prompt_token_ids=prompt_ids,
            sampling=sampling,
            max_tokens=max_tokens,
            stop=body.stop_strings,
            structured=constraint[1] if constraint is not None else None,
            adapter=self.catalog.resolve(body.model),
            cache_salt=body.cache_salt or "",
        )

    async def _respond(
        self,
        request: Request,
        spec: GenerationSpec,
        body: SamplingRequest,
        shape: _Shape,
        endpoint: str,
    ) -> Response:
        request_id_var.set(spec.request_id)
        started = time.perf_counter()
        exclude = None if body.include_usage else {"usage"}
        try:
            first, deltas = await start_generation(
                request,
                self.generator,
                spec,
                self.metrics,
                endpoint,
                started,
                # The stream's first events are framed from what this renders while the
                # engine computes; the answer to a request without a stream waits for all.
                while_engine_computes=(lambda: shape.prepare_events(exclude))
                if body.stream
                else None,
            )
        except ApiError as exc:
            raise OpenAIError.of(exc) from exc
        headers = {"x-request-id": spec.request_id}
        if body.stream:
            events = self._stream_events(first, deltas, shape, spec, exclude)
            return EventStream(events, headers)
        try:
            await until_disconnected(request, shape.collect(first, deltas))
        except GENERATION_FAILURES as exc:
            raise openai_error_for(exc) from exc
        finally:
            await deltas.aclose()
        usage = shape.usage(len(spec.prompt_token_ids))
        self._log_finished(spec, usage, started)
        return _json_response(shape.final(usage), headers)

    async def _stream_events(
        self,
        first: SampleDelta,
        deltas: AsyncIterator[SampleDelta],
        shape: _Shape,
        spec: GenerationSpec,
        exclude: set[str] | None,
    ) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        # Events that are ready together go out in one write: each write is a syscall and a
        # wakeup of the client, which on a busy host costs more than building the events.
        try:  # contextlib.aclosing(deltas), without its two coroutines per request
            try:
                events = shape.opening_events(exclude) + shape.events(first, exclude)
                if events:
                    yield events
                async for delta in deltas:
                    events = shape.events(delta, exclude)
                    if events:
                        yield events
            except GENERATION_FAILURES as exc:
                logger.warning("engine failed mid-stream", extra={"error": str(exc)})
                error = orjson.dumps(openai_error_for(exc).body())
                yield FinalEvents(b"data: " + error + b"\n\ndata: [DONE]\n\n")
                return
        finally:
            await deltas.aclose()
        usage = shape.usage(len(spec.prompt_token_ids))
        tail = _sse(shape.usage_chunk(usage), None) if exclude is None else b""
        yield FinalEvents(tail + b"data: [DONE]\n\n")
        self._log_finished(spec, usage, started)

    def _log_finished(self, spec: GenerationSpec, usage: Usage, started: float) -> None:
        self.metrics.generation_tokens.inc(usage.completion_tokens)
        logger.info(
            "request finished",
            extra={
                "request_id": spec.request_id,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "duration_s": round(time.perf_counter() - started, 4),
            },
        )


def build_openai_router(routes: OpenAIRoutes) -> APIRouter:
    """The ``/v1`` routes (the API-key middleware guards the prefix)."""
    router = APIRouter(prefix="/v1", tags=["OpenAI"])
    errors = error_responses(ErrorResponse, GENERATION_ERRORS)
    router.add_api_route(
        "/models",
        routes.list_models,
        methods=["GET"],
        response_model=ModelList,
        responses=error_responses(ErrorResponse, {401: GENERATION_ERRORS[401]}),
    )
    router.add_api_route(
        "/models/{model_id:path}",
        routes.retrieve_model,
        methods=["GET"],
        response_model=ModelCard,
        responses=error_responses(
            ErrorResponse, {401: GENERATION_ERRORS[401], 404: GENERATION_ERRORS[404]}
        ),
    )
    router.add_api_route(
        "/completions",
        routes.completions,
        methods=["POST"],
        response_model=None,
        responses={200: _generation_response(Completion), **errors},
    )
    router.add_api_route(
        "/chat/completions",
        routes.chat_completions,
        methods=["POST"],
        response_model=None,
        responses={200: _generation_response(ChatCompletion), **errors},
    )
    return router


def _generation_response(model: type) -> dict[str, Any]:
    return {
        "model": model,
        "description": "the whole answer; with `stream` true, server-sent events of chunks "
        "(`data: {json}`), ending with `data: [DONE]`",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }


# -- response shapes ---------------------------------------------------------------------------


class _Shape(ABC):
    """How one API family turns sample deltas into chunks and a final response."""

    def __init__(
        self, tokenizer: ModelTokenizer, request_id: str, model: str, n: int, *, with_logprobs: bool
    ) -> None:
        self.tokenizer = tokenizer
        self.request_id = request_id
        self.model = model
        self.n = n
        self.with_logprobs = with_logprobs
        self.created = int(time.time())
        self.texts = [""] * n
        self.num_tokens = [0] * n
        self.finish_reasons: list[str | None] = [None] * n
        self._templates: dict[int, _TextEventTemplate] = {}
        self._opening_events: bytes | None = None

    def prepare_events(self, exclude: set[str] | None) -> None:
        """Renders what the stream's first events are framed from (the opening chunks, each
        sample's text-event template), so that the first token does not wait for it."""
        self.opening_events(exclude)
        for index in range(self.n):
            self._text_template(index, exclude)

    def opening_events(self, exclude: set[str] | None) -> bytes:
        """The stream's opening chunks, framed (rendered once)."""
        if self._opening_events is None:
            self._opening_events = _sse_events(self.opening_chunks(), exclude)
        return self._opening_events

    def record(self, delta: SampleDelta) -> None:
        self.texts[delta.index] += delta.text
        self.num_tokens[delta.index] = delta.num_tokens
        if delta.finish_reason is not None:
            self.finish_reasons[delta.index] = delta.finish_reason

    async def collect(self, first: SampleDelta, rest: AsyncIterator[SampleDelta]) -> None:
        self.accumulate(first)
        async for delta in rest:
            self.accumulate(delta)

    def usage(self, prompt_tokens: int) -> Usage:
        completion = sum(self.num_tokens)
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            total_tokens=prompt_tokens + completion,
        )

    @abstractmethod
    def accumulate(self, delta: SampleDelta) -> None: ...

    @abstractmethod
    def opening_chunks(self) -> list[BaseModel]: ...

    @abstractmethod
    def chunks(self, delta: SampleDelta) -> list[BaseModel]: ...

    def events(self, delta: SampleDelta, exclude: set[str] | None) -> bytes:
        """The delta's chunks as framed server-sent events (``b""`` when it has none)."""
        return _sse_events(self.chunks(delta), exclude)

    @abstractmethod
    def text_chunk(self, index: int, text: str) -> BaseModel:
        """The chunk of sample ``index`` that carries ``text`` and nothing else."""

    def _text_event(self, index: int, text: str, exclude: set[str] | None) -> bytes:
        """``_sse(self.text_chunk(index, text), exclude)``, the same bytes, without building
        the chunk: most events of a stream are of this kind."""
        return self._text_template(index, exclude).render(text)

    def _text_template(self, index: int, exclude: set[str] | None) -> _TextEventTemplate:
        template = self._templates.get(index)
        if template is None:
            template = self._templates[index] = _TextEventTemplate(
                lambda text: self.text_chunk(index, text), exclude
            )
        return template

    @abstractmethod
    def usage_chunk(self, usage: Usage) -> BaseModel: ...

    @abstractmethod
    def final(self, usage: Usage) -> BaseModel: ...


class _ChatShape(_Shape):
    """Chat output, read by one output parser per sample into content, reasoning and tool
    calls; a sample that called a tool finishes with "tool_calls" instead of "stop"."""

    def __init__(self, *args: Any, parsers: list[OutputParser], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(self.n)]
        self.parsers = parsers
        self.parsed = [ParsedDelta() for _ in range(self.n)]

    def _parse(self, delta: SampleDelta) -> ParsedDelta:
        parser = self.parsers[delta.index]
        parsed = parser.feed(delta.text, delta.token_ids)
        if delta.finish_reason is not None:
            parsed.extend(parser.finish())
        self.parsed[delta.index].extend(parsed)
        return parsed

    def _finish_reason(self, index: int, reason: str | None) -> str:
        reason = reason or "stop"
        return "tool_calls" if reason == "stop" and self.parsers[index].num_tool_calls else reason

    def _chunk(
        self, choices: list[ChatChunkChoice], usage: Usage | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def _logprobs(self, delta: SampleDelta) -> list[TokenLogprob]:
        return [_chat_logprob(self.tokenizer, entry) for entry in delta.logprobs]

    def accumulate(self, delta: SampleDelta) -> None:
        self.record(delta)
        self._parse(delta)
        if self.with_logprobs:
            self.logprobs[delta.index].extend(self._logprobs(delta))

    def opening_chunks(self) -> list[BaseModel]:
        return [
            self._chunk(
                [ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))]
            )
            for index in range(self.n)
        ]

    def chunks(self, delta: SampleDelta) -> list[BaseModel]:
        self.record(delta)
        return self._chunks(delta, self._parse(delta))

    def events(self, delta: SampleDelta, exclude: set[str] | None) -> bytes:
        self.record(delta)
        parsed = self._parse(delta)
        if (
            parsed.content
            and not parsed.reasoning
            and not parsed.tool_calls
            and not self.with_logprobs
            and delta.finish_reason is None
        ):
            return self._text_event(delta.index, parsed.content, exclude)
        return _sse_events(self._chunks(delta, parsed), exclude)

    def text_chunk(self, index: int, text: str) -> BaseModel:
        return self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(content=text))])

    def _chunks(self, delta: SampleDelta, parsed: ParsedDelta) -> list[BaseModel]:
        deltas: list[ChatDelta] = []
        if parsed.content or parsed.reasoning or (self.with_logprobs and delta.logprobs):
            deltas.append(
                ChatDelta(
                    content=parsed.content if parsed.content or not parsed.reasoning else None,
                    reasoning_content=parsed.reasoning or None,
                )
            )
        deltas.extend(ChatDelta(tool_calls=[chunk]) for chunk in _tool_call_chunks(parsed))
        out: list[BaseModel] = []
        for position, chat_delta in enumerate(deltas):
            # The tokens' logprobs ride on the first chunk the tokens produced.
            with_logprobs = self.with_logprobs and position == 0
            logprobs = ChatLogprobs(content=self._logprobs(delta)) if with_logprobs else None
            out.append(
                self._chunk(
                    [ChatChunkChoice(index=delta.index, delta=chat_delta, logprobs=logprobs)]
                )
            )
        if delta.finish_reason is not None:
            reason = self._finish_reason(delta.index, delta.finish_reason)
            out.append(
                self._chunk(
                    [ChatChunkChoice(index=delta.index, delta=ChatDelta(), finish_reason=reason)]
                )
            )
        return out

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self._chunk([], usage)

    def final(self, usage: Usage) -> BaseModel:
        choices = [
            ChatChoice(
                index=index,
                message=_assistant_message(self.parsed[index]),
                logprobs=ChatLogprobs(content=self.logprobs[index]) if self.with_logprobs else None,
                finish_reason=self._finish_reason(index, self.finish_reasons[index]),
            )
            for index in range(self.n)
        ]
        return ChatCompletion(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )


class _CompletionShape(_Shape):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logprobs = [CompletionLogprobs() for _ in range(self.n if self.with_logprobs else 0)]

    def _logprobs(self, delta: SampleDelta, text_offset: int) -> CompletionLogprobs:
        """The delta's tokens, the first placed at ``text_offset`` (the sample's text length
        before the delta) and each next one after the text of those before it."""
        logprobs = CompletionLogprobs()
        for entry in delta.logprobs:
            token = self.tokenizer.token_text(entry.token_id)
            logprobs.tokens.append(token)
            logprobs.token_logprobs.append(entry.logprob)
            logprobs.top_logprobs.append(
                {self.tokenizer.token_text(top.token_id): top.logprob for top in entry.top}
            )
            logprobs.text_offset.append(text_offset)
            text_offset += len(token)
        return logprobs

    def accumulate(self, delta: SampleDelta) -> None:
        offset = len(self.texts[delta.index])
        self.record(delta)
        if self.with_logprobs:
            part = self._logprobs(delta, offset)
            whole = self.logprobs[delta.index]
            whole.tokens += part.tokens
            whole.token_logprobs += part.token_logprobs
            whole.top_logprobs += part.top_logprobs
            whole.text_offset += part.text_offset

    def opening_chunks(self) -> list[BaseModel]:
        return []

    def events(self, delta: SampleDelta, exclude: set[str] | None) -> bytes:
        if delta.text and not self.with_logprobs and delta.finish_reason is None:
            self.record(delta)
            return self._text_event(delta.index, delta.text, exclude)
        return _sse_events(self.chunks(delta), exclude)

    def text_chunk(self, index: int, text: str) -> BaseModel:
        choice = CompletionChoice(index=index, text=text)
        return Completion(
            id=self.request_id, created=self.created, model=self.model, choices=[choice]
        )

    def chunks(self, delta: SampleDelta) -> list[BaseModel]:
        if not delta.text and not delta.logprobs and delta.finish_reason is None:
            return []
        offset = len(self.texts[delta.index])
        self.record(delta)
        logprobs = self._logprobs(delta, offset) if self.with_logprobs else None
        choice = CompletionChoice(
            index=delta.index, text=delta.text, logprobs=logprobs, finish_reason=delta.finish_reason
        )
        return [
            Completion(id=self.request_id, created=self.created, model=self.model, choices=[choice])
        ]

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return Completion(
            id=self.request_id, created=self.created, model=self.model, choices=[], usage=usage
        )

    def final(self, usage: Usage) -> BaseModel:
        choices = [
            CompletionChoice(
                index=index,
                text=self.texts[index],
                logprobs=self.logprobs[index] if self.with_logprobs else None,
                finish_reason=self.finish_reasons[index] or "stop",
            )
            for index in range(self.n)
        ]
        return Completion(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )


# -- helpers -----------------------------------------------------------------------------------


def _json_response(body: BaseModel, headers: dict[str, str]) -> Response:
    # pydantic's Rust serializer writes the bytes at once, with no dict in between.
    return Response(body.model_dump_json(), media_type="application/json", headers=headers)


def _model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model `{model}` does not exist.",
        type="invalid_request_error",
        param="model",
        code="model_not_found",
    )


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _sse(chunk: BaseModel, exclude: set[str] | None) -> bytes:
    return b"data: " + chunk.model_dump_json(exclude=exclude).encode() + b"\n\n"


def _sse_events(chunks: list[BaseModel], exclude: set[str] | None) -> bytes:
    return b"".join(_sse(chunk, exclude) for chunk in chunks)


class _TextEventTemplate:
    """The framed event of a chunk whose only varying part is one string: pydantic renders
    the chunk once with a marker for the string, and each event is that rendering with the
    string's JSON (pydantic's serializer again) where the marker's was. Should the marker's
    JSON show up more than once (a model name holding it), every event is rendered whole."""

    _MARKER = "\x00text\x00"

    def __init__(self, chunk: Callable[[str], BaseModel], exclude: set[str] | None) -> None:
        self._exclude = exclude
        rendered = _sse(chunk(self._MARKER), exclude)
        parts = rendered.split(pydantic_core.to_json(self._MARKER))
        self._parts = (parts[0], parts[1]) if len(parts) == 2 else None
        # Kept only where it is needed: ``chunk`` holds the response's shape, which holds this
        # template, and that cycle would leave every request's shape to the garbage collector.
        self._chunk = chunk if self._parts is None else None

    def render(self, text: str) -> bytes:
        if self._parts is None:
            assert self._chunk is not None
            return _sse(self._chunk(text), self._exclude)
        head, tail = self._parts
        return head + pydantic_core.to_json(text) + tail


def _chat_logprob(tokenizer: ModelTokenizer, entry: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(
        token=tokenizer.token_text(entry.token_id),
        logprob=entry.logprob,
        bytes=list(tokenizer.token_bytes(entry.token_id)),
        top_logprobs=[
            TopLogprob(
                token=tokenizer.token_text(top.token_id),
                logprob=top.logprob,
                bytes=list(tokenizer.token_bytes(top.token_id)),
            )
            for top in entry.top
        ],
    )


def _tool_choice(body: ChatCompletionRequest) -> ToolChoice:
    """The request's tool choice; OpenAI's default is auto with tools, none without."""
    choice = body.tool_choice
    if choice is None:
        return ToolChoice("auto" if body.tools else "none")
    if isinstance(choice, str):
        return ToolChoice(choice)
    return ToolChoice("named", choice.function.name)


def _output_constraint(body: SamplingRequest) -> tuple[str, common_pb2.StructuredOutput] | None:
    """The one output constraint the request asks for (response_format, vLLM's
    structured_outputs or its guided_* fields) and the field it came from, not yet compiled;
    400 when several are given."""
    if (
        body.response_format is None
        and body.structured_outputs is None
        and body.guided_json is None
        and body.guided_regex is None
        and body.guided_grammar is None
    ):
        return None  # most requests: nothing to look at
    constraints: list[tuple[str, common_pb2.StructuredOutput]] = []
    try:
        response_format = body.response_format
        if response_format is not None and response_format.type == "json_object":
            constraints.append(("response_format", common_pb2.StructuredOutput(json_object=True)))
        elif response_format is not None and response_format.type == "json_schema":
            if response_format.json_schema is None:
                raise ConstraintError(
                    "response_format of type json_schema needs a json_schema",
                    "response_format.json_schema",
                )
            constraints.append(
                (
                    "response_format.json_schema.schema",
                    common_pb2.StructuredOutput(
                        json_schema=json.dumps(response_format.json_schema.schema_)
                    ),
                )
            )
        params = body.structured_outputs
        if params is not None:
            constraint = make_constraint(
                json_schema=params.json_,
                json_object=bool(params.json_object),
                regex=params.regex,
                grammar=params.grammar,
                backend=params.backend or "",
                param="structured_outputs",
            )
            if constraint is not None:
                constraints.append(("structured_outputs", constraint))
        guided = make_constraint(
            json_schema=body.guided_json,
            regex=body.guided_regex,
            grammar=body.guided_grammar,
            backend=body.guided_decoding_backend or "",
            param="guided_json",
        )
        if guided is not None:
            constraints.append((f"guided_{guided.WhichOneof('kind')}", guided))
        if len(constraints) > 1:
            raise ConstraintError(
                "give at most one output constraint, got "
                + ", ".join(param for param, _ in constraints),
                constraints[1][0],
            )
    except ConstraintError as exc:
        raise openai_error_for(exc) from exc
    return constraints[0] if constraints else None


def _tool_call_chunks(parsed: ParsedDelta) -> list[ToolCallChunk]:
    """OpenAI's tool-call deltas: a call's opening (id, type, name, empty arguments), then
    its argument fragments, consecutive fragments of one call joined."""
    chunks: list[ToolCallChunk] = []
    for part in parsed.tool_calls:
        if part.id is not None:
            chunks.append(
                ToolCallChunk(
                    index=part.index,
                    id=part.id,
                    type="function",
                    function=FunctionCallDelta(name=part.name, arguments=""),
                )
            )
        elif chunks and chunks[-1].index == part.index and chunks[-1].id is None:
            chunks[-1].function.arguments = (chunks[-1].function.arguments or "") + part.arguments
        else:
            chunks.append(
                ToolCallChunk(
                    index=part.index, function=FunctionCallDelta(arguments=part.arguments)
                )
            )
    return chunks


def _assistant_message(parsed: ParsedDelta) -> AssistantMessage:
    calls: dict[int, ToolCall] = {}
    for part in parsed.tool_calls:
        if part.id is not None:
            calls[part.index] = ToolCall(
                id=part.id, function=FunctionCall(name=part.name or "", arguments="")
            )
        else:
            calls[part.index].function.arguments += part.arguments
    return AssistantMessage(
        content=parsed.content if parsed.content or not calls else None,
        tool_calls=[calls[index] for index in sorted(calls)] or None,
        reasoning_content=parsed.reasoning or None,
    )


def _template_message(
    message: ChatMessage, position: int, image_refs: list[ImageRef]
) -> dict[str, Any]:
    """The message as the chat template sees it: text parts joined into one string (a list
    of text and ``{"type": "image"}`` parts when it holds images, each image's reference
    added to ``image_refs``), and tool calls' arguments as objects (templates write them
    out with ``tojson``)."""
    rendered = message.model_dump(exclude_none=True)
    for call in rendered.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except json.JSONDecodeError:
                raise invalid_request(
                    "tool call arguments must be a JSON object",
                    param=f"messages.{position}.tool_calls",
                ) from None
    if isinstance(message.content, list):
        texts = []
        parts: list[dict[str, Any]] = []
        for index, part in enumerate(message.content):
            if part.type == "image_url" and part.image_url is not None:
                param = f"messages.{position}.content.{index}.image_url"
                image_refs.append(ImageRef(param, url=part.image_url.url))
                parts.append({"type": "image"})
                continue
            if part.type != "text" or part.text is None:
                raise invalid_request(
                    f"content parts of type '{part.type}' are not supported by this model",
                    param=f"messages.{position}.content",
                )
            texts.append(part.text)
            parts.append({"type": "text", "text": part.text})
        has_images = any(p["type"] == "image" for p in parts)
        rendered["content"] = parts if has_images else "".join(texts)
    elif message.content is None:
        rendered["content"] = ""
    return rendered
