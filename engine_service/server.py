"""The engine service: a ``grpc.aio`` server around one in-process :class:`LLMEngine`.

It owns the threading between the event loop and the synchronous, non-thread-safe engine,
the mapping between the wire messages and the engine's types, the replica's registration
with the controller, and its Prometheus metrics (under vLLM's names).

::

    event loop (gRPC handlers)                       engine thread (the only one touching the engine)
      Generate ─ _Add ──▶ ┐                           ┌─▶ apply commands: add_request / abort
      Abort ─── _Abort ─▶ ├─ deque + Condition ──────▶┤
      cancel ── _Abort ─▶ ┘                           └─▶ step() ─▶ outputs, stats snapshot
      per-request asyncio.Queue ◀── loop.call_soon_threadsafe(outputs) ──┘

The engine thread sleeps on the condition while it has no commands and no unfinished
requests. Readers of load figures (GetStats, heartbeats, /metrics) use the snapshot of
``engine.stats()`` that the thread publishes after every iteration.

KV events (blocks the engine started or stopped holding) are drained after every iteration
too and fanned out by a :class:`KVEventHub` to ``WatchKVEvents`` streams. Gateways watch each
replica directly rather than reading events off heartbeats: events change every step, only
gateways need them, and a stream gives them within a step instead of a heartbeat interval
later, without the controller relaying them. With ``kv_service_address`` set, the engine's
offload tiers reach the KV service through :mod:`engine_service.kv_connector`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine_service.engine import (
    EngineConfig,
    EngineStats,
    LLMEngine,
    RequestOutput,
    SamplingParams,
)
from engine_service.engine.kv_events import KVEvent, KVTier
from engine_service.engine.structured import GrammarSpec
from engine_service.kv_connector import KVServiceStore
from switchyard.demo import resolve_model
from switchyard.grpc_utils import (
    GrpcServer,
    abort_with,
    create_server,
    insecure_channel,
    serve_until_signalled,
)
from switchyard.log import request_id_var
from switchyard.metrics import MetricsServer, start_metrics_server
from switchyard.settings import EngineSettings
from switchyard.v1 import (
    common_pb2,
    controller_pb2,
    controller_pb2_grpc,
    engine_pb2,
    engine_pb2_grpc,
)

logger = logging.getLogger(__name__)

ENGINE_SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["EngineService"].full_name
CONTROLLER_RPC_TIMEOUT_S = 5.0
SHUTDOWN_GRACE_S = 5.0
# The host tier stages blocks on their way to the KV service; it gets at least this much.
KV_STAGING_HOST_BYTES = 64 << 20
# Event batches a KV-event watcher may fall behind by before it is cut off.
KV_EVENT_QUEUE_BATCHES = 1024


# ---------------------------------------------------------------------------------------------
# The engine thread


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    cache_salt: str = ""


@dataclass(slots=True)
class _Abort:
    request_id: str


class EngineLoop:
    """Runs ``engine``'s step loop in one dedicated thread.

    Callers on any thread hand it commands with :meth:`add` and :meth:`abort`. It reports
    back on ``loop`` through ``loop.call_soon_threadsafe``: each step's outputs to
    ``on_outputs``, a rejected request (``add_request`` raised) to ``on_rejected``, a
    failed step to ``on_step_failed``, and the engine's KV events to ``on_kv_events``.
    """

    def __init__(
        self,
        engine: LLMEngine,
        loop: asyncio.AbstractEventLoop,
        on_outputs: Callable[[list[RequestOutput]], None],
        on_rejected: Callable[[str, Exception], None],
        on_step_failed: Callable[[Exception], None],
        on_kv_events: Callable[[list[KVEvent]], None] | None = None,
    ) -> None:
        self._engine = engine
        self._on_kv_events = on_kv_events
        self._loop = loop
        self._on_outputs = on_outputs
        self._on_rejected = on_rejected
        self._on_step_failed = on_step_failed
        self._commands: deque[_Add | _Abort] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.stats: EngineStats = engine.stats()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current step; requests still in the engine are dropped."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join()

    def add(self, command: _Add) -> None:
        self._submit(command)

    def abort(self, request_id: str) -> None:
        self._submit(_Abort(request_id))

    def _submit(self, command: _Add | _Abort) -> None:
        with self._wakeup:
            self._commands.append(command)
            self._wakeup.notify()

    def _run(self) -> None:
        engine = self._engine
        while True:
            with self._wakeup:
                while not (self._commands or self._stopping or engine.has_unfinished()):
                    self._wakeup.wait()
                if self._stopping:
                    return
                commands = list(self._commands)
                self._commands.clear()
            for command in commands:
                self._apply(command)
            outputs: list[RequestOutput] = []
            if engine.has_unfinished():
                try:
                    outputs = engine.step()
                except Exception as exc:
                    # Whatever the step left half-done, its requests cannot go on: end them
                    # here, on the engine's own thread, so their blocks come back at once
                    # instead of the same failing batch being retried until aborts arrive.
                    logger.exception("engine step failed; ending the requests in flight")
                    for request_id in engine.unfinished_request_ids():
                        engine.abort(request_id)
                    engine.discard_pending_outputs()
                    self._loop.call_soon_threadsafe(self._on_step_failed, exc)
            self.stats = engine.stats()
            if outputs:
                self._loop.call_soon_threadsafe(self._on_outputs, outputs)
            if self._on_kv_events is not None and engine.kv_events is not None:
                events = engine.kv_events.drain()
                if events:
                    self._loop.call_soon_threadsafe(self._on_kv_events, events)

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            self._engine.abort(command.request_id)
            return
        try:
            self._engine.add_request(
                command.request_id,
                command.prompt_token_ids,
                command.params,
                command.priority,
                command.cache_salt,
            )
        except Exception as exc:
            self._loop.call_soon_threadsafe(self._on_rejected, command.request_id, exc)


# ---------------------------------------------------------------------------------------------
# Metrics


# vLLM's buckets, so that dashboards built for vLLM read the same.
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class _StatsCollector(Collector):
    """Exports the engine's load snapshot at scrape time under vLLM's gauge/counter names."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self._model_name = model_name
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        labels = [self._model_name]
        gauges = [
            ("vllm:num_requests_running", "Requests in the running batch.", stats.num_running),
            ("vllm:num_requests_waiting", "Requests waiting to run.", stats.num_waiting),
            (
                "vllm:kv_cache_usage_perc",
                "Fraction of KV-cache blocks in use (0..1).",
                stats.kv_usage,
            ),
        ]
        for name, doc, value in gauges:
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric(labels, value)
            yield gauge
        # prometheus_client appends _total: vllm:prompt_tokens_total etc., as vLLM exports.
        counters = [
            (
                "vllm:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                stats.prefix_cache_queries,
            ),
            (
                "vllm:prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                stats.prefix_cache_hits,
            ),
            ("vllm:num_preemptions", "Preemptions of running requests.", stats.num_preemptions),
            (
                "switchyard:kv_offloaded_blocks",
                "KV blocks copied from the device pool to the host tier.",
                stats.offloaded_blocks,
            ),
            (
                "switchyard:kv_recomputed_tokens",
                "Tokens admitted sequences computed instead of reusing from any KV tier.",
                stats.recomputed_tokens,
            ),
            (
                "switchyard:kv_remote_put_blocks",
                "KV blocks the KV service accepted from this replica.",
                stats.remote_put_blocks,
            ),
            (
                "switchyard:kv_remote_errors",
                "Failed calls to the KV service (served as misses).",
                stats.remote_errors,
            ),
            ("vllm:prompt_tokens", "Prompt tokens processed.", stats.prompt_tokens_total),
            ("vllm:generation_tokens", "Tokens generated.", stats.generation_tokens_total),
            (
                "switchyard:jump_forward_tokens",
                "Output tokens a grammar forced, appended by jump-forward without sampling.",
                stats.jump_forward_tokens,
            ),
        ]
        for name, doc, value in counters:
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric(labels, value)
            yield counter
        yield from _tier_metrics(labels, stats)


def _tier_metrics(labels: list[str], stats: EngineStats) -> Iterator[Metric]:
    """Prefix hits and restores per KV tier; remote hits are the prompt tokens this replica
    skipped because another one (or an earlier life of this one) computed them."""
    hits = CounterMetricFamily(
        "switchyard:kv_hit_tokens",
        "Prompt tokens served from a KV tier instead of computed.",
        labels=["model_name", "tier"],
    )
    for tier, value in (
        ("device", stats.prefix_cache_hits),
        ("host", stats.host_hit_tokens),
        ("remote", stats.remote_hit_tokens),
    ):
        hits.add_metric([*labels, tier], value)
    yield hits
    restored = CounterMetricFamily(
        "switchyard:kv_restored_blocks",
        "KV blocks copied back into the device pool from a lower tier.",
        labels=["model_name", "tier"],
    )
    restored.add_metric([*labels, "host"], stats.restored_blocks_host)
    restored.add_metric([*labels, "remote"], stats.restored_blocks_remote)
    yield restored
    gauges = [
        ("switchyard:kv_host_blocks", "KV blocks in the host tier.", stats.host_blocks),
        (
            "switchyard:kv_host_capacity_blocks",
            "KV blocks the host tier can hold.",
            stats.host_capacity_blocks,
        ),
        (
            "switchyard:kv_remote_available",
            "1 while the KV service answers (0 when it does not, or none is configured).",
            int(stats.remote_available),
        ),
    ]
    for name, doc, value in gauges:
        gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
        gauge.add_metric(labels, value)
        yield gauge


class EngineMetrics:
    """The replica's Prometheus registry: the engine's snapshot plus per-request latencies."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(model_name, stats))
        histograms = {
            "ttft": ("vllm:time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS),
            "itl": (
                "vllm:inter_token_latency_seconds",
                "Time between output tokens.",
                _ITL_BUCKETS,
            ),
            "tpot": (
                "vllm:time_per_output_token_seconds",
                "Time per output token (same as inter-token latency).",
                _ITL_BUCKETS,
            ),
            "e2e": (
                "vllm:e2e_request_latency_seconds",
                "End-to-end request latency.",
                _E2E_BUCKETS,
            ),
        }
        built = {
            key: Histogram(
                name, doc, ["model_name"], buckets=buckets, registry=self.registry
            ).labels(model_name)
            for key, (name, doc, buckets) in histograms.items()
        }
        self.time_to_first_token = built["ttft"]
        self.inter_token_latency = built["itl"]
        self.time_per_output_token = built["tpot"]
        self.e2e_request_latency = built["e2e"]
        self._success = Counter(
            "vllm:request_success",
            "Finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self._model_name = model_name

    def observe_gap(self, gap_s: float, num_tokens: int) -> None:
        """Tokens that arrived ``gap_s`` after the sample's previous ones."""
        per_token = gap_s / num_tokens
        for _ in range(num_tokens):
            self.inter_token_latency.observe(per_token)
            self.time_per_output_token.observe(per_token)

    def request_finished(self, finish_reason: str) -> None:
        self._success.labels(self._model_name, finish_reason).inc()


# ---------------------------------------------------------------------------------------------
# The gRPC service


@dataclass(slots=True)
class _Stream:
    """What the event loop keeps for one Generate call."""

    n: int
    queue: asyncio.Queue[RequestOutput | Exception] = field(default_factory=asyncio.Queue)
    done: bool = False  # the engine holds nothing more for it (finished, rejected or aborted)


def load_from_stats(stats: EngineStats) -> common_pb2.ReplicaLoad:
    return common_pb2.ReplicaLoad(
        num_running=stats.num_running,
        num_waiting=stats.num_waiting,
        kv_usage=stats.kv_usage,
        prefix_hit_rate=stats.prefix_hit_rate,
        prefix_cache_queries=stats.prefix_cache_queries,
        prefix_cache_hits=stats.prefix_cache_hits,
        num_preemptions=stats.num_preemptions,
        prompt_tokens_total=stats.prompt_tokens_total,
        generation_tokens_total=stats.generation_tokens_total,
        host_hit_tokens=stats.host_hit_tokens,
        remote_hit_tokens=stats.remote_hit_tokens,
        recomputed_tokens=stats.recomputed_tokens,
    )


def sampling_params_from_proto(
    sampling: common_pb2.SamplingParams, num_prompt_tokens: int, max_model_len: int
) -> SamplingParams:
    """The engine's parameters for a request; raises ``ValueError`` when one is out of range.

    Unset proto3 fields mean: ``n`` 1, ``max_tokens`` the rest of the context window,
    ``temperature`` 0 (greedy), ``top_p`` 1, ``repetition_penalty`` 1, no seed, no logprobs.
    """
    return SamplingParams(
        n=sampling.n or 1,
        max_tokens=sampling.max_tokens or max(1, max_model_len - num_prompt_tokens),
        min_tokens=sampling.min_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p or 1.0,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        repetition_penalty=sampling.repetition_penalty or 1.0,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop_token_ids=list(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
        logprobs=sampling.logprobs if sampling.HasField("logprobs") else None,
    )


def grammar_spec_from_proto(structured: common_pb2.StructuredOutput) -> GrammarSpec | None:
    """The engine's spec for a request's ``structured`` field; ``None`` when it names no
    constraint. Raises ``ValueError`` for an unknown backend, an empty constraint, or
    ``json_object`` set to false."""
    kind = structured.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "json_object":
        if not structured.json_object:
            raise ValueError("structured.json_object must be true when set")
        return GrammarSpec("json_object", backend=structured.backend)
    return GrammarSpec(kind, getattr(structured, kind), structured.backend)


def response_from_output(output: RequestOutput) -> engine_pb2.GenerateResponse:
    response = engine_pb2.GenerateResponse(
        index=output.index,
        token_ids=output.new_token_ids,
        finished=output.finished,
        finish_reason=output.finish_reason or "",
        num_prompt_tokens=output.num_prompt_tokens,
        num_cached_tokens=output.num_cached_tokens,
    )
    if output.stop_token_id is not None:
        response.stop_token_id = output.stop_token_id
    for logprob in output.new_logprobs or ():
        response.logprobs.append(
            common_pb2.TokenLogprob(
                token_id=logprob.token_id,
                logprob=logprob.logprob,
                top=[common_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in logprob.top],
            )
        )
    return response


class KVEventHub:
    """What the replica holds, per tier, and the ``WatchKVEvents`` streams to tell.

    It mirrors the engine's block set from its events (the engine thread cannot be asked),
    so a new watcher starts from a snapshot of the mirror and then gets every later batch.
    Runs on the event loop only.
    """

    def __init__(self, replica_id: str, block_size: int) -> None:
        self.replica_id = replica_id
        self.block_size = block_size
        self._held: dict[KVTier, set[bytes]] = {tier: set() for tier in KVTier}
        self._watchers: set[asyncio.Queue[engine_pb2.KVEventBatch | None]] = set()

    def publish(self, events: list[KVEvent]) -> None:
        for event in events:
            held = self._held[event.tier]
            if event.stored:
                held.update(event.block_hashes)
            else:
                held.difference_update(event.block_hashes)
        batch = self._batch(events, snapshot=False)
        for queue in list(self._watchers):
            try:
                queue.put_nowait(batch)
            except asyncio.QueueFull:
                # Too far behind to catch up by events: end its stream; it resubscribes.
                self._watchers.discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)

    async def watch(self) -> AsyncIterator[engine_pb2.KVEventBatch]:
        """The snapshot, then every batch; ends with ``OverflowError`` when cut off."""
        queue: asyncio.Queue[engine_pb2.KVEventBatch | None] = asyncio.Queue(KV_EVENT_QUEUE_BATCHES)
        self._watchers.add(queue)
        try:
            snapshot = [KVEvent(True, tier, list(hashes)) for tier, hashes in self._held.items()]
            yield self._batch(snapshot, snapshot=True)
            while (batch := await queue.get()) is not None:
                yield batch
            raise OverflowError("fell too far behind the replica's KV events; watch again")
        finally:
            self._watchers.discard(queue)

    def _batch(self, events: list[KVEvent], *, snapshot: bool) -> engine_pb2.KVEventBatch:
        return engine_pb2.KVEventBatch(
            snapshot=snapshot,
            replica_id=self.replica_id,
            block_size=self.block_size,
            events=[
                engine_pb2.KVEvent(
                    stored=event.stored, tier=int(event.tier), block_hashes=event.block_hashes
                )
                for event in events
            ],
        )


class EngineServicer(engine_pb2_grpc.EngineServiceServicer):
    """``EngineService`` over an :class:`EngineLoop`; runs on the event loop only."""

    def __init__(
        self,
        replica_id: str,
        model_name: str,
        max_model_len: int,
        block_size: int,
        metrics: EngineMetrics,
    ) -> None:
        self.replica_id = replica_id
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.metrics = metrics
        self.engine_loop: EngineLoop | None = None  # set by EngineServer before serving
        self.kv_events = KVEventHub(replica_id, block_size)
        self._streams: dict[str, _Stream] = {}

    # Callbacks from the engine thread, run on the event loop.

    def deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.queue.put_nowait(output)

    def reject(self, request_id: str, exc: Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.done = True
            stream.queue.put_nowait(exc)

    def fail_all(self, exc: Exception) -> None:
        error = RuntimeError(f"engine step failed: {exc}")
        for stream in self._streams.values():
            stream.done = True
            stream.queue.put_nowait(error)

    # RPCs.

    async def Generate(
        self, request: engine_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        assert self.engine_loop is not None
        arrival = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex
        # Each RPC runs in its own task, hence its own context: no reset needed.
        request_id_var.set(request_id)
        if request.adapter:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "LoRA adapters are not supported by this engine"
            )
        if request_id in self._streams:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"request {request_id} is already running"
            )
        prompt = list(request.prompt_token_ids)
        try:
            params = sampling_params_from_proto(request.sampling, len(prompt), self.max_model_len)
            if request.HasField("structured"):
                params.structured = grammar_spec_from_proto(request.structured)
        except ValueError as exc:
            await abort_with(context, exc)
        stream = _Stream(n=params.n)
        self._streams[request_id] = stream
        self.engine_loop.add(_Add(request_id, prompt, params, request.priority, request.cache_salt))
        logger.info(
            "request queued",
            extra={
                "num_prompt_tokens": len(prompt),
                "n": params.n,
                "max_tokens": params.max_tokens,
            },
        )
        try:
            async for response in self._stream_responses(stream, arrival, context):
                yield response
        finally:
            del self._streams[request_id]
            if not stream.done:
                self.engine_loop.abort(request_id)
                logger.info("request ended before finishing; aborted in the engine")

    async def _stream_responses(
        self, stream: _Stream, arrival: float, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        finished: set[int] = set()
        last_token_at: dict[int, float] = {}
        num_output_tokens = 0
        while len(finished) < stream.n:
            item = await stream.queue.get()
            if isinstance(item, Exception):
                logger.info("request failed: %s", item)
                await abort_with(context, item)
            now = time.monotonic()
            if item.new_token_ids:
                if not last_token_at:
                    self.metrics.time_to_first_token.observe(now - arrival)
                elif item.index in last_token_at:
                    self.metrics.observe_gap(
                        now - last_token_at[item.index], len(item.new_token_ids)
                    )
                last_token_at[item.index] = now
                num_output_tokens += len(item.new_token_ids)
            if item.finished:
                finished.add(item.index)
                if len(finished) == stream.n:
                    stream.done = True
                    self.metrics.e2e_request_latency.observe(now - arrival)
                    self.metrics.request_finished(item.finish_reason or "stop")
                    logger.info(
                        "request finished",
                        extra={
                            "finish_reason": item.finish_reason,
                            "num_output_tokens": num_output_tokens,
                            "num_cached_tokens": item.num_cached_tokens,
                            "e2e_s": round(now - arrival, 4),
                        },
                    )
            yield response_from_output(item)

    async def Abort(
        self, request: engine_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.AbortResponse:
        assert self.engine_loop is not None
        # The engine answers the abort with a finish_reason "abort" output for every sample
        # still running, which ends the request's Generate stream.
        stream = self._streams.get(request.request_id)
        if stream is None or stream.done:
            return engine_pb2.AbortResponse(found=False)
        self.engine_loop.abort(request.request_id)
        logger.info("abort requested", extra={"aborted_request_id": request.request_id})
        return engine_pb2.AbortResponse(found=True)

    async def GetStats(
        self, request: engine_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.GetStatsResponse:
        assert self.engine_loop is not None
        stats = self.engine_loop.stats
        return engine_pb2.GetStatsResponse(
            replica_id=self.replica_id,
            model=self.model_name,
            load=load_from_stats(stats),
            max_model_len=self.max_model_len,
            num_blocks_total=stats.num_blocks_total,
            num_blocks_free=stats.num_blocks_free,
            block_size=self.block_size,
        )

    async def WatchKVEvents(
        self, request: engine_pb2.WatchKVEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[engine_pb2.KVEventBatch]:
        try:
            async for batch in self.kv_events.watch():
                yield batch
        except OverflowError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))


# ---------------------------------------------------------------------------------------------
# The controller link


class ControllerLink:
    """Keeps this replica registered: Register, then Heartbeat every interval with the
    current load; registers again when the controller answers ``known=false`` (it
    restarted) and retries quietly while it is unreachable. The engine serves regardless."""

    def __init__(
        self,
        address: str,
        replica: Callable[[], common_pb2.Replica],
        interval_s: float,
    ) -> None:
        self._address = address
        self._replica = replica
        self._interval_s = interval_s
        self._channel = insecure_channel(address)
        self._stub = controller_pb2_grpc.ControllerServiceStub(self._channel)
        self._registered = False

    async def run(self) -> None:
        reachable = True
        while True:
            try:
                await self._beat()
                if not reachable:
                    logger.info("controller %s reachable again", self._address)
                reachable = True
            except grpc.aio.AioRpcError as exc:
                if reachable:
                    logger.warning(
                        "controller %s unreachable (%s); retrying every %.1fs",
                        self._address,
                        exc.code().name,
                        self._interval_s,
                    )
                reachable = False
            await asyncio.sleep(self._interval_s)

    async def _beat(self) -> None:
        replica = self._replica()
        if self._registered:
            answer = await self._stub.Heartbeat(
                controller_pb2.HeartbeatRequest(replica_id=replica.replica_id, load=replica.load),
                timeout=CONTROLLER_RPC_TIMEOUT_S,
            )
            if answer.known:
                return
            logger.info("controller does not know this replica; registering again")
            self._registered = False
        registered = await self._stub.Register(
            controller_pb2.RegisterRequest(replica=replica), timeout=CONTROLLER_RPC_TIMEOUT_S
        )
        self._registered = True
        if registered.heartbeat_interval_s > 0:
            self._interval_s = registered.heartbeat_interval_s
        logger.info("registered with controller %s as %s", self._address, replica.replica_id)

    async def deregister(self, replica_id: str) -> None:
        """Leave the routing table at once; a controller that is down learns it from the
        missing heartbeats instead."""
        try:
            if self._registered:
                await self._stub.Deregister(
                    controller_pb2.DeregisterRequest(replica_id=replica_id),
                    timeout=CONTROLLER_RPC_TIMEOUT_S,
                )
                logger.info("deregistered from controller %s", self._address)
        except grpc.aio.AioRpcError as exc:
            logger.warning("deregister failed: %s", exc.code().name)
        finally:
            self._registered = False
            await self._channel.close()


# ---------------------------------------------------------------------------------------------
# The server


def engine_config_from_settings(settings: EngineSettings, model_path: str) -> EngineConfig:
    device = settings.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return EngineConfig(
        model=model_path,
        dtype=settings.dtype,
        device=device,
        max_model_len=settings.max_model_len,
        block_size=settings.block_size,
        num_kv_blocks=settings.num_kv_blocks,
        kv_cache_memory_bytes=settings.kv_cache_memory_bytes,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        enable_prefix_caching=settings.enable_prefix_caching,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_num_seqs=settings.max_num_seqs,
        enable_chunked_prefill=settings.enable_chunked_prefill,
        long_prefill_token_threshold=settings.long_prefill_token_threshold,
        attention_backend=settings.attention_backend,
        enable_cuda_graphs=settings.enable_cuda_graphs,
        cuda_graph_max_batch=settings.cuda_graph_max_batch,
        grammar_backend=settings.grammar_backend,
        enable_jump_forward=settings.enable_jump_forward,
        async_scheduling=settings.async_scheduling,
        speculative_config=settings.speculative_config,
        seed=settings.seed,
        enable_kv_offload=bool(settings.kv_offload_host_bytes or settings.kv_service_address),
        kv_offload_host_bytes=max(
            settings.kv_offload_host_bytes,
            KV_STAGING_HOST_BYTES if settings.kv_service_address else 0,
        ),
        kv_write_through=settings.kv_write_through,
        enable_kv_events=True,
    )


class EngineServer:
    """One engine replica: loads the model, serves EngineService, health and /metrics, and
    registers with the controller. ``start`` then ``stop``; ``port`` and ``metrics_port``
    are the bound ports once started."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.model_name = settings.served_model_name or settings.model
        self.port = 0
        self.metrics_port = 0
        self.replica_id = settings.replica_id
        self._engine: LLMEngine | None = None
        self._kv_store: KVServiceStore | None = None
        self._engine_loop: EngineLoop | None = None
        self._max_model_len = 0
        self._grpc: GrpcServer | None = None
        self._metrics_server: MetricsServer | None = None
        self._controller: ControllerLink | None = None
        self._controller_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        settings = self.settings
        model_path = await asyncio.to_thread(resolve_model, settings.model, settings.data_dir)
        config = engine_config_from_settings(settings, model_path)
        logger.info("loading model %s on %s", model_path, config.device)
        if settings.kv_service_address:
            self._kv_store = KVServiceStore(settings.kv_service_address)
        engine = await asyncio.to_thread(LLMEngine, config, self._kv_store)
        self._engine = engine

        grpc_server = create_server(settings.host, settings.port, [ENGINE_SERVICE_NAME])
        self._grpc = grpc_server
        self.port = grpc_server.port
        self.replica_id = self.replica_id or f"engine-{socket.gethostname()}-{self.port}"

        metrics = EngineMetrics(self.model_name, lambda: self._current_stats())
        servicer = EngineServicer(
            self.replica_id, self.model_name, engine.max_model_len, config.block_size, metrics
        )
        engine_loop = EngineLoop(
            engine,
            asyncio.get_running_loop(),
            servicer.deliver,
            servicer.reject,
            servicer.fail_all,
            on_kv_events=servicer.kv_events.publish,
        )
        servicer.engine_loop = engine_loop
        self._engine_loop = engine_loop
        self._max_model_len = engine.max_model_len
        engine_pb2_grpc.add_EngineServiceServicer_to_server(servicer, grpc_server.server)

        self._metrics_server = start_metrics_server(
            settings.metrics_port, metrics.registry, settings.host
        )
        self.metrics_port = self._metrics_server.port
        engine_loop.start()
        await grpc_server.start()
        await grpc_server.set_serving(True)
        logger.info(
            "engine serving",
            extra={
                "replica_id": self.replica_id,
                "port": self.port,
                "metrics_port": self.metrics_port,
                "model": self.model_name,
                "max_model_len": engine.max_model_len,
            },
        )
        if settings.controller_address:
            self._controller = ControllerLink(
                settings.controller_address, self._replica, settings.heartbeat_interval_s
            )
            self._controller_task = asyncio.create_task(self._controller.run())

    def _current_stats(self) -> EngineStats:
        assert self._engine_loop is not None
        return self._engine_loop.stats

    def _advertise_host(self) -> str:
        if self.settings.advertise_host:
            return self.settings.advertise_host
        if self.settings.host in ("", "0.0.0.0", "::", "[::]"):
            return "127.0.0.1"
        return self.settings.host

    def _replica(self) -> common_pb2.Replica:
        host = self._advertise_host()
        return common_pb2.Replica(
            replica_id=self.replica_id,
            address=f"{host}:{self.port}",
            model=self.model_name,
            role=common_pb2.REPLICA_ROLE_UNSPECIFIED,
            state=common_pb2.REPLICA_STATE_READY,
            load=load_from_stats(self._current_stats()),
            max_model_len=self._max_model_len,
            metrics_address=f"{host}:{self.metrics_port}",
            last_heartbeat_unix=time.time(),
        )

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """NOT_SERVING, deregister, drain for ``grace_s`` (then cancel), stop the engine."""
        logger.info("engine shutting down")
        if self._grpc is not None:
            await self._grpc.set_serving(False)
        if self._controller_task is not None:
            self._controller_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._controller_task
        if self._controller is not None:
            await self._controller.deregister(self.replica_id)
        if self._grpc is not None:
            await self._grpc.stop(grace_s)
        if self._engine_loop is not None:
            await asyncio.to_thread(self._engine_loop.stop)
        if self._engine is not None:
            await asyncio.to_thread(self._engine.close)
        if self._kv_store is not None:
            self._kv_store.close()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        logger.info("engine stopped")


async def serve(settings: EngineSettings) -> None:
    """Run a replica until SIGTERM or SIGINT, then shut it down gracefully."""
    server = EngineServer(settings)
    await serve_until_signalled(server.start, server.stop)
