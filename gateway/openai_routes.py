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

import asyncio
import json
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from gateway.engine_client import EngineError
from gateway.errors import OpenAIError, invalid_request
from gateway.generation import ContextLengthError, GenerationSpec, Generator, SampleDelta
from gateway.metrics import GatewayMetrics
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
    ModelCard,
    ModelList,
    SamplingRequest,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from gateway.routing import NoReplicaAvailable
from gateway.tokenization import ModelTokenizer, TemplateError
from switchyard.log import request_id_var
from switchyard.v1 import common_pb2

logger = logging.getLogger(__name__)

T = TypeVar("T")

_STATUS_BY_ENGINE_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def openai_error_for(exc: Exception) -> OpenAIError:
    """The OpenAI error a failed generation is answered with."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return invalid_request(str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, TemplateError):
        return invalid_request(str(exc), param="messages")
    if isinstance(exc, NoReplicaAvailable):
        return OpenAIError(503, str(exc), code="no_replica_available")
    if isinstance(exc, EngineError):
        status = _STATUS_BY_ENGINE_CODE.get(exc.code, 500)
        return OpenAIError(
            status, f"engine error: {exc.message or exc.code.name}", code=exc.code.name.lower()
        )
    raise exc


class OpenAIRoutes:
    """The handlers, bound to the generator and the deployment's limits."""

    def __init__(
        self, generator: Generator, metrics: GatewayMetrics, served_model_name: str, max_n: int
    ) -> None:
        self.generator = generator
        self.tokenizer: ModelTokenizer = generator.tokenizer
        self.metrics = metrics
        self.served_model_name = served_model_name
        self.max_n = max_n
        self.created = int(time.time())

    # -- /v1/models --------------------------------------------------------------------------

    async def list_models(self) -> ModelList:
        card = ModelCard(
            id=self.served_model_name,
            created=self.created,
            max_model_len=self.generator.max_model_len(),
        )
        return ModelList(data=[card])

    # -- /v1/chat/completions ----------------------------------------------------------------

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check_common(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise invalid_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        request_id = _new_id("chatcmpl")
        messages = [
            _template_message(message, position) for position, message in enumerate(body.messages)
        ]
        try:
            prompt_ids = await self.tokenizer.encode_chat(messages, body.chat_template_kwargs)
        except TemplateError as exc:
            raise openai_error_for(exc) from exc
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        spec = self._spec(request_id, body, prompt_ids, body.output_limit, logprobs)
        shape = _ChatShape(
            self.tokenizer, request_id, body.model, body.n, with_logprobs=logprobs is not None
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
        if not prompt_ids:
            raise invalid_request("the prompt must not be empty", param="prompt")
        request_id = _new_id("cmpl")
        spec = self._spec(request_id, body, prompt_ids, body.max_tokens, body.logprobs)
        shape = _CompletionShape(
            self.tokenizer, request_id, body.model, body.n, with_logprobs=body.logprobs is not None
        )
        return await self._respond(request, spec, body, shape, "/v1/completions")

    # -- shared --------------------------------------------------------------------------------

    def _check_common(self, body: SamplingRequest) -> None:
        if body.model != self.served_model_name:
            raise OpenAIError(
                404,
                f"The model `{body.model}` does not exist.",
                param="model",
                code="model_not_found",
            )
        if body.n > self.max_n:
            raise invalid_request(f"n must be at most {self.max_n}, got {body.n}", param="n")

    def _spec(
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
        return GenerationSpec(
            request_id=request_id,
            model=body.model,
            prompt_token_ids=prompt_ids,
            sampling=sampling,
            max_tokens=max_tokens,
            stop=body.stop_strings,
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
        deltas = self.generator.generate(spec)
        try:
            first = await _until_disconnected(request, anext(deltas))
        except (ContextLengthError, NoReplicaAvailable, EngineError) as exc:
            await deltas.aclose()
            raise openai_error_for(exc) from exc
        except BaseException:
            await deltas.aclose()
            raise
        self.metrics.time_to_first_token.labels(endpoint).observe(time.perf_counter() - started)
        self.metrics.prompt_tokens.inc(len(spec.prompt_token_ids))
        headers = {"x-request-id": spec.request_id}
        if body.stream:
            events = self._stream_events(
                first, deltas, shape, spec, include_usage=body.include_usage
            )
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        try:
            await _until_disconnected(request, shape.collect(first, deltas))
        except (NoReplicaAvailable, EngineError) as exc:
            raise openai_error_for(exc) from exc
        finally:
            await deltas.aclose()
        usage = shape.usage(len(spec.prompt_token_ids))
        self._log_finished(spec, usage, started)
        return JSONResponse(shape.final(usage).model_dump(mode="json"), headers=headers)

    async def _stream_events(
        self,
        first: SampleDelta,
        deltas: AsyncIterator[SampleDelta],
        shape: _Shape,
        spec: GenerationSpec,
        *,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        exclude = None if include_usage else {"usage"}
        async with aclosing(deltas):
            try:
                for chunk in shape.opening_chunks():
                    yield _sse(chunk, exclude)
                for chunk in shape.chunks(first):
                    yield _sse(chunk, exclude)
                async for delta in deltas:
                    for chunk in shape.chunks(delta):
                        yield _sse(chunk, exclude)
            except (NoReplicaAvailable, EngineError) as exc:
                logger.warning("engine failed mid-stream", extra={"error": str(exc)})
                yield f"data: {_json(openai_error_for(exc).body())}\n\n".encode()
                yield b"data: [DONE]\n\n"
                return
        usage = shape.usage(len(spec.prompt_token_ids))
        if include_usage:
            yield _sse(shape.usage_chunk(usage), None)
        yield b"data: [DONE]\n\n"
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
    router = APIRouter(prefix="/v1")
    router.add_api_route("/models", routes.list_models, methods=["GET"], response_model=ModelList)
    router.add_api_route("/completions", routes.completions, methods=["POST"], response_model=None)
    router.add_api_route(
        "/chat/completions", routes.chat_completions, methods=["POST"], response_model=None
    )
    return router


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

    @abstractmethod
    def usage_chunk(self, usage: Usage) -> BaseModel: ...

    @abstractmethod
    def final(self, usage: Usage) -> BaseModel: ...


class _ChatShape(_Shape):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(self.n)]

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
        out: list[BaseModel] = []
        if delta.text or (self.with_logprobs and delta.logprobs):
            logprobs = ChatLogprobs(content=self._logprobs(delta)) if self.with_logprobs else None
            out.append(
                self._chunk(
                    [
                        ChatChunkChoice(
                            index=delta.index,
                            delta=ChatDelta(content=delta.text),
                            logprobs=logprobs,
                        )
                    ]
                )
            )
        if delta.finish_reason is not None:
            out.append(
                self._chunk(
                    [
                        ChatChunkChoice(
                            index=delta.index, delta=ChatDelta(), finish_reason=delta.finish_reason
                        )
                    ]
                )
            )
        return out

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self._chunk([], usage)

    def final(self, usage: Usage) -> BaseModel:
        choices = [
            ChatChoice(
                index=index,
                message=AssistantMessage(content=self.texts[index]),
                logprobs=ChatLogprobs(content=self.logprobs[index]) if self.with_logprobs else None,
                finish_reason=self.finish_reasons[index] or "stop",
            )
            for index in range(self.n)
        ]
        return ChatCompletion(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )


class _CompletionShape(_Shape):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logprobs = [CompletionLogprobs() for _ in range(self.n)]

    def _logprobs(self, delta: SampleDelta, text_offset: int) -> CompletionLogprobs:
        """The delta's tokens, placed at the sample's text length before the delta."""
        logprobs = CompletionLogprobs()
        for entry in delta.logprobs:
            logprobs.tokens.append(self.tokenizer.token_text(entry.token_id))
            logprobs.token_logprobs.append(entry.logprob)
            logprobs.top_logprobs.append(
                {self.tokenizer.token_text(top.token_id): top.logprob for top in entry.top}
            )
            logprobs.text_offset.append(text_offset)
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

    def chunks(self, delta: SampleDelta) -> list[BaseModel]:
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


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def _sse(chunk: BaseModel, exclude: set[str] | None) -> bytes:
    return b"data: " + chunk.model_dump_json(exclude=exclude).encode() + b"\n\n"


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


def _template_message(message: ChatMessage, position: int) -> dict[str, Any]:
    """The message as the chat template sees it, with text parts joined into one string."""
    rendered = message.model_dump(exclude_none=True)
    if isinstance(message.content, list):
        texts = []
        for part in message.content:
            if part.type != "text" or part.text is None:
                raise invalid_request(
                    f"content parts of type '{part.type}' are not supported by this model",
                    param=f"messages.{position}.content",
                )
            texts.append(part.text)
        rendered["content"] = "".join(texts)
    elif message.content is None:
        rendered["content"] = ""
    return rendered


async def _until_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Awaits ``awaitable`` unless the client goes away first (then it is cancelled)."""
    work: asyncio.Future[T] = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done():
        work.cancel()
        raise OpenAIError(499, "the client closed the request", code="client_closed_request")
    return work.result()


async def _disconnected(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
