"""``EngineService``: the gRPC handlers of one replica, on the event loop.

Generate validates and maps the request, hands it to the :class:`EngineLoop` and streams the
engine's outputs back; Abort, GetStats and WatchKVEvents answer from the loop's snapshot
and the :class:`KVEventHub`; Load/UnloadLoRAAdapter go through
:mod:`engine_service.lora_service`. Disaggregation (:mod:`engine_service.kv_handoff_service`):
a Generate naming a ``prefill_address`` imports its prompt's KV from that engine, and Prefill
serves such imports for another engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from engine_service.engine import LLMEngine, RequestOutput
from engine_service.engine.kv_handoff import HandoffEvent, KVReserved
from engine_service.engine.lora_manager import LoRADisabledError
from engine_service.engine_loop import AddCommand, EngineLoop
from engine_service.kv_event_hub import KVEventHub
from engine_service.kv_handoff_service import (
    PrefillClient,
    kv_layout,
    layout_mismatch,
    prefill_stream,
)
from engine_service.lora_service import adapter_infos, load_adapter, unload_adapter
from engine_service.mappings import (
    grammar_spec_from_proto,
    images_from_proto,
    load_from_stats,
    response_from_output,
    sampling_params_from_proto,
)
from engine_service.metrics import EngineMetrics
from switchyard.grpc_utils import abort_with
from switchyard.log import request_id_var
from switchyard.v1 import common_pb2, engine_pb2, engine_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Stream:
    """What the event loop keeps for one Generate call."""

    n: int
    queue: asyncio.Queue[RequestOutput | HandoffEvent | Exception] = field(
        default_factory=asyncio.Queue
    )
    done: bool = False  # the engine holds nothing more for it (finished, rejected or aborted)


class EngineServicer(engine_pb2_grpc.EngineServiceServicer):
    """``EngineService`` over an :class:`EngineLoop`; runs on the event loop only."""

    def __init__(
        self,
        replica_id: str,
        model_name: str,
        max_model_len: int,
        block_size: int,
        metrics: EngineMetrics,
        max_queued_requests: int = 0,
        max_num_seqs: int = 0,
        role: int = common_pb2.REPLICA_ROLE_UNSPECIFIED,
        kv_transfer_timeout_s: float = 30.0,
    ) -> None:
        self.replica_id = replica_id
        self.role = role
        self.kv_transfer_timeout_s = kv_transfer_timeout_s
        # Set with the engine (EngineServer): the KV layout, and the client that imports
        # prompts from prefill engines.
        self.layout: engine_pb2.KVLayout | None = None
        self.prefill_client: PrefillClient | None = None
        self._reservations: dict[str, asyncio.Future[int]] = {}
        self._handoff_seconds_total = 0.0
        self.max_queued_requests = max_queued_requests  # 0: unbounded
        self.max_num_seqs = max_num_seqs
        metrics.max_queued_requests.set(max_queued_requests)
        metrics.queue_depth.set_function(lambda: self.queue_depth())
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.metrics = metrics
        self.engine_loop: EngineLoop | None = None  # set by EngineServer before serving
        self.engine: LLMEngine | None = None  # read-only use off the engine thread (LoRA)
        self.kv_events = KVEventHub(replica_id, block_size)
        self._streams: dict[str, _Stream] = {}
        self._num_compiling = 0  # accepted requests whose grammar is being compiled

    def queue_depth(self) -> int:
        """Requests accepted that wait for a place in the running batch (grammars being
        compiled included)."""
        if self.engine_loop is None:
            return 0
        return self.engine_loop.queue_depth() + self._num_compiling

    def load(self) -> common_pb2.ReplicaLoad:
        """The replica's load for heartbeats and GetStats, queue depth and capacity included."""
        assert self.engine_loop is not None
        load = load_from_stats(
            self.engine_loop.stats,
            num_queued=self.queue_depth(),
            max_num_seqs=self.max_num_seqs,
            max_queued_requests=self.max_queued_requests,
        )
        load.kv_handoff_seconds_total = self._handoff_seconds_total
        return load

    def attach_engine(self, engine_loop: EngineLoop, engine: LLMEngine) -> None:
        """Serve ``engine`` through ``engine_loop`` (before the server starts)."""
        self.engine_loop = engine_loop
        self.engine = engine
        self.layout = kv_layout(engine)
        self.prefill_client = PrefillClient(
            self.layout, self.replica_id, engine_loop.call, self.kv_transfer_timeout_s
        )

    async def close(self) -> None:
        if self.prefill_client is not None:
            await self.prefill_client.close()

    # Callbacks from the engine thread, run on the event loop.

    def deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.queue.put_nowait(output)

    def deliver_handoff(self, events: list[HandoffEvent]) -> None:
        """KV hand-off events of the engine: reservations wake the imports waiting for them;
        prompt chunks and first tokens go to the Prefill streams they belong to."""
        for event in events:
            if isinstance(event, KVReserved):
                reserved = self._reservations.pop(event.request_id, None)
                if reserved is not None and not reserved.done():
                    reserved.set_result(event.num_held_blocks)
                continue
            stream = self._streams.get(event.request_id)
            if stream is not None:
                stream.queue.put_nowait(event)

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
        if request_id in self._streams:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"request {request_id} is already running"
            )
        prompt = list(request.prompt_token_ids)
        try:
            params = sampling_params_from_proto(request.sampling, len(prompt), self.max_model_len)
            if request.HasField("structured"):
                params.structured = grammar_spec_from_proto(request.structured)
            images = images_from_proto(request.images)
        except ValueError as exc:
            await abort_with(context, exc)
        depth = self.queue_depth()
        if self.max_queued_requests and depth >= self.max_queued_requests:
            self.metrics.request_refused()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the replica's queue is full ({depth} requests waiting); retry later",
            )
        stream = _Stream(n=params.n)
        self._streams[request_id] = stream
        # Disaggregated: the prompt's KV comes from a prefill engine. Requests the hand-off
        # does not cover (n > 1, LoRA adapters, images) are computed here.
        import_kv = (
            bool(request.prefill_address)
            and params.n == 1
            and not request.adapter
            and not request.images
        )
        handoff: asyncio.Task[None] | None = None
        if import_kv:
            reserved = asyncio.get_running_loop().create_future()
            self._reservations[request_id] = reserved
            handoff = asyncio.create_task(self._import_prompt(request, request_id, reserved))
        try:
            grammar = None
            if params.structured is not None:
                self._num_compiling += 1
                try:
                    grammar = await self.engine_loop.compile_grammar(params.structured)
                except ValueError as exc:
                    stream.done = True
                    await abort_with(context, exc)
                finally:
                    self._num_compiling -= 1
            if not stream.done:  # a failed step may have ended it while its grammar compiled
                command = AddCommand(
                    request_id,
                    prompt,
                    params,
                    request.priority,
                    request.cache_salt,
                    grammar,
                    request.adapter,
                    images,
                    import_kv=import_kv,
                )
                self.engine_loop.add(command)
            logger.info(
                "request queued",
                extra={
                    "num_prompt_tokens": len(prompt),
                    "n": params.n,
                    "max_tokens": params.max_tokens,
                },
            )
            async for response in self._stream_responses(stream, arrival, context):
                yield response
        finally:
            del self._streams[request_id]
            self._reservations.pop(request_id, None)
            if handoff is not None:
                handoff.cancel()  # cancels the Prefill call: the prefill engine aborts too
            if not stream.done:
                self.engine_loop.abort(request_id)
                logger.info("request ended before finishing; aborted in the engine")

    async def _import_prompt(
        self,
        request: engine_pb2.GenerateRequest,
        request_id: str,
        reserved: asyncio.Future[int],
    ) -> None:
        """Once the engine has reserved the prompt's blocks, have the prefill engine fill
        them (or, failing that, recompute the prompt here)."""
        assert self.prefill_client is not None
        num_held_blocks = await reserved
        outcome = await self.prefill_client.import_prompt(request, request_id, num_held_blocks)
        self.metrics.handoff_finished(
            outcome.ok, outcome.bytes_received, outcome.handoff_seconds, outcome.prefill_seconds
        )
        if outcome.ok:
            self._handoff_seconds_total += outcome.handoff_seconds
        logger.info(
            "KV hand-off done" if outcome.ok else "KV hand-off failed; prompt recomputed",
            extra={
                "prefill_address": request.prefill_address,
                "num_held_blocks": num_held_blocks,
                "blocks_received": outcome.blocks_received,
                "bytes_received": outcome.bytes_received,
                "prefill_s": round(outcome.prefill_seconds, 4),
                "handoff_s": round(outcome.handoff_seconds, 4),
                "reason": outcome.reason,
            },
        )

    async def Prefill(
        self, request: engine_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[engine_pb2.PrefillResponse]:
        """Compute a decode engine's prompt and stream its KV back (see
        :mod:`engine_service.kv_handoff_service`)."""
        assert self.engine_loop is not None and self.layout is not None
        generate = request.request
        request_id_var.set(generate.request_id)
        mismatch = layout_mismatch(self.layout, request.layout)
        if mismatch:
            logger.error(
                "KV hand-off refused: layouts differ",
                extra={"decode_replica_id": request.decode_replica_id, "reason": mismatch},
            )
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"prefill engine {self.replica_id} cannot hand KV to "
                f"{request.decode_replica_id or 'the caller'}: {mismatch}",
            )
        # Its own key: a retried request may be prefilled here again for another decode engine.
        key = f"{generate.request_id or uuid.uuid4().hex}@{request.decode_replica_id}"
        if key in self._streams:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"prefill {key} is running")
        prompt = list(generate.prompt_token_ids)
        try:
            params = sampling_params_from_proto(generate.sampling, len(prompt), self.max_model_len)
            if generate.HasField("structured"):
                params.structured = grammar_spec_from_proto(generate.structured)
            if params.n != 1:
                raise ValueError("a prefill for a decode engine takes n == 1")
        except ValueError as exc:
            await abort_with(context, exc)
        stream = _Stream(n=1)
        self._streams[key] = stream
        try:
            grammar = None
            if params.structured is not None:
                try:
                    grammar = await self.engine_loop.compile_grammar(params.structured)
                except ValueError as exc:
                    stream.done = True
                    await abort_with(context, exc)
            self.engine_loop.add(
                AddCommand(
                    key,
                    prompt,
                    params,
                    generate.priority,
                    generate.cache_salt,
                    grammar,
                    generate.adapter,
                    kv_export_skip_blocks=request.num_skip_blocks,
                )
            )
            try:
                async for message in prefill_stream(stream.queue):
                    if message.HasField("result"):
                        stream.done = True
                    yield message
            except Exception as exc:  # the engine refused or failed the request
                stream.done = True
                await abort_with(context, exc)
        finally:
            del self._streams[key]
            if not stream.done:
                self.engine_loop.abort(key)
                logger.info("prefill ended before its first token; aborted in the engine")

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
            load=self.load(),
            max_model_len=self.max_model_len,
            num_blocks_total=stats.num_blocks_total,
            num_blocks_free=stats.num_blocks_free,
            block_size=self.block_size,
            lora_adapters=adapter_infos(stats.lora),
            max_loras=stats.lora.max_loras if stats.lora is not None else 0,
            role=self.role,
            kv_layout=self.layout,
        )

    async def LoadLoRAAdapter(
        self, request: engine_pb2.LoadLoRAAdapterRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.LoadLoRAAdapterResponse:
        assert self.engine_loop is not None and self.engine is not None
        try:
            reply = await load_adapter(self.engine, self.engine_loop.call, request)
        except LoRADisabledError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except (ValueError, FileExistsError) as exc:
            await abort_with(context, exc)
        logger.info("LoRA adapter loaded", extra={"lora_name": request.lora_name})
        return reply

    async def UnloadLoRAAdapter(
        self, request: engine_pb2.UnloadLoRAAdapterRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.UnloadLoRAAdapterResponse:
        assert self.engine_loop is not None
        try:
            reply = await unload_adapter(self.engine_loop.call, request)
        except LoRADisabledError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except (ValueError, KeyError) as exc:
            await abort_with(context, exc)
        logger.info("LoRA adapter unloaded", extra={"lora_name": request.lora_name})
        return reply

    async def WatchKVEvents(
        self, request: engine_pb2.WatchKVEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[engine_pb2.KVEventBatch]:
        try:
            async for batch in self.kv_events.watch():
                yield batch
        except OverflowError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
