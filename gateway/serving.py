"""The HTTP side of one generation, shared by every API family (OpenAI, Anthropic).

:func:`start_generation` starts a :class:`GenerationSpec` and waits for its first delta: up
to that point a failure is still an HTTP error response, after it a broken stream.
:func:`until_disconnected` stops waiting when the client goes away. :func:`failure_for`
says how a failed generation is answered, as an API-neutral :class:`ApiError` that each
API family turns into its own error type and format:

=========================================  ======  ==================================
failure                                    status  ``code`` (``Retry-After``)
=========================================  ======  ==================================
the gateway is at its in-flight bound      429     ``gateway_overloaded`` (1 s)
every ready replica is at its bound        429     ``replicas_overloaded`` (1 s)
every tried engine's queue was full        429     ``engine_overloaded`` (1 s)
no replica is ready                        503     ``no_replica_available`` (2 s)
the engines could not be reached           503     ``engine_unavailable`` (2 s)
the request ran past the gateway timeout   504     ``deadline_exceeded``
the engine refused the input               400     ``invalid_argument``
=========================================  ======  ==================================

Messages never carry what the gRPC layer says about an engine (its address, the socket
error): that goes to the log; the client learns what happened and whether to retry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from fastapi import Request

from gateway.admission import GatewayBusy
from gateway.engine_client import EngineError
from gateway.errors import ApiError
from gateway.generation import ContextLengthError, GenerationSpec, Generator, SampleDelta
from gateway.harmony import HarmonyInputError
from gateway.http_protocol import ON_DISCONNECT, DisconnectCallbacks
from gateway.metrics import GatewayMetrics
from gateway.routing import NoReplicaAvailable, ReplicasBusy
from gateway.structured import ConstraintError
from gateway.tokenization import TemplateError

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_AFTER_BUSY_S = 1
RETRY_AFTER_UNAVAILABLE_S = 2

# Failures a generation may end with, before or during its stream.
GENERATION_FAILURES = (ContextLengthError, GatewayBusy, NoReplicaAvailable, EngineError)


def failure_for(exc: Exception) -> ApiError:
    """How a failed generation is answered (see the module's table); re-raises what is not
    a generation failure."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextLengthError):
        return ApiError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, TemplateError | HarmonyInputError):
        return ApiError(400, str(exc), param="messages")
    if isinstance(exc, ConstraintError):
        return ApiError(400, str(exc), param=exc.param)
    if isinstance(exc, GatewayBusy):
        return _busy(str(exc), "gateway_overloaded")
    if isinstance(exc, ReplicasBusy):
        return _busy("every engine replica is at capacity; retry later", "replicas_overloaded")
    if isinstance(exc, NoReplicaAvailable):
        return _unavailable(
            "no engine replica is ready to serve the request", "no_replica_available"
        )
    if isinstance(exc, EngineError):
        return _engine_failure(exc)
    raise exc


def _busy(message: str, code: str) -> ApiError:
    return ApiError(429, message, code=code, retry_after_s=RETRY_AFTER_BUSY_S)


def _unavailable(message: str, code: str) -> ApiError:
    return ApiError(503, message, code=code, retry_after_s=RETRY_AFTER_UNAVAILABLE_S)


def _engine_failure(exc: EngineError) -> ApiError:
    code = exc.code
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        # Our own engine's words about the request's values: safe and useful to show.
        return ApiError(400, f"engine error: {exc.message}", code=code.name.lower())
    if code == grpc.StatusCode.NOT_FOUND:  # its LoRA adapter was unloaded while it waited
        return ApiError(404, f"engine error: {exc.message}", code="model_not_found")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return _busy("every engine replica's queue is full; retry later", "engine_overloaded")
    logger.warning("engine failure answered to the client", extra={"error": str(exc)})
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED):
        return _unavailable(
            "the engine replicas could not take the request; retry later", "engine_unavailable"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ApiError(
            504, "the request did not finish within the gateway's timeout", code="deadline_exceeded"
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return ApiError(400, f"engine error: {exc.message}", code="unimplemented")
    return ApiError(500, "the engine failed to run the request", code=code.name.lower())


async def start_generation(
    request: Request,
    generator: Generator,
    spec: GenerationSpec,
    metrics: GatewayMetrics,
    endpoint: str,
    started: float,
    *,
    while_engine_computes: Callable[[], object] | None = None,
) -> tuple[SampleDelta, AsyncIterator[SampleDelta]]:
    """Start ``spec`` and wait for its first delta; raises :class:`ApiError` (429 and 503
    counted in ``switchyard_gateway_rejected_requests`` by code). ``started`` is when the
    request arrived, for the time-to-first-token histogram. ``while_engine_computes`` runs
    once the request has gone to an engine: the response's preparation, off the path
    between the first token and the client."""
    deltas = generator.generate(spec, on_sent=while_engine_computes)
    try:
        first = await until_disconnected(request, anext(deltas))
    except GENERATION_FAILURES as exc:
        await deltas.aclose()
        error = failure_for(exc)
        if error.status in (429, 503):
            metrics.rejected_requests.labels(error.code or "").inc()
        raise error from exc
    except BaseException:
        await deltas.aclose()
        raise
    # Counted at the loop's next turn: the first events go out before that.
    loop = asyncio.get_running_loop()
    loop.call_soon(metrics.first_token_latency(endpoint).observe, time.perf_counter() - started)
    loop.call_soon(metrics.prompt_tokens.inc, len(spec.prompt_token_ids))
    return first, deltas


async def until_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Awaits ``awaitable`` in this task unless the client goes away first; then it is
    cancelled, has finished unwinding when this raises a 499 :class:`ApiError`, and the
    generator it was advancing can be closed. This runs on every request: under the
    gateway's own HTTP protocol the connection's loss is a callback
    (:class:`~gateway.http_protocol.DisconnectCallbacks`), elsewhere one watcher task reads
    ``receive``."""
    task = asyncio.current_task()
    assert task is not None
    gone = finished = False

    def client_gone() -> None:
        nonlocal gone
        if not finished:
            gone = True
            task.cancel()

    callbacks = request.scope.get(ON_DISCONNECT)
    watcher: asyncio.Task[None] | None = None
    starting: asyncio.Handle | None = None
    if isinstance(callbacks, DisconnectCallbacks):
        callbacks.add(client_gone)
    else:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            client_gone()

        def start_watching() -> None:
            nonlocal watcher
            if not finished:
                watcher = asyncio.create_task(watch())

        # The watcher starts at the loop's next turn, so that its first step (a wait on the
        # connection) runs after the steps the awaited work queues on its own first step:
        # the engine call's send, which would otherwise wait for it.
        starting = asyncio.get_running_loop().call_soon(start_watching)
    try:
        result = await awaitable
        finished = True
        return result
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        raise ApiError(499, "the client closed the request", code="client_closed_request") from None
    finally:
        finished = True
        if isinstance(callbacks, DisconnectCallbacks):
            callbacks.remove(client_gone)
        if starting is not None:
            starting.cancel()
        if watcher is not None:
            watcher.cancel()
