"""Prefill/decode disaggregation over gRPC: the two ends of a KV hand-off between engines.

::

    gateway ──Generate(prefill_address=P)──▶ decode engine D                 prefill engine P
                                               │ reserve the prompt's blocks
                                               │ (own prefix hits: num_held)
                                               ├──Prefill(request, layout, skip=num_held)──▶ │
                                               │                                          │ check layout
                                               │◀── PrefillResponse(blocks k..) ──────────┤ chunk done
                                               │    receive_kv: copy into reserved blocks │ ...
                                               │◀── PrefillResponse(blocks .., result) ───┤ first token
                                               │ finish_kv_import: accept token, run
    gateway ◀── tokens ────────────────────────┘

The decode engine owns the request from start to end: it is what the gateway calls, so the
gateway's failover, deadlines and cancellation work unchanged. It tells the prefill engine
which blocks it needs (all but those it holds) and its layout; the prefill engine streams
them straight back on that call as its chunked prefill finishes them, so the transfer runs
while later chunks compute. A transfer that fails, times out, or is refused (another model,
block size or dtype) ends in :meth:`LLMEngine.fail_kv_import`: the decode engine computes
the prompt itself. Cancelling the decode request cancels the Prefill call, which aborts the
request on the prefill engine; both free their blocks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import torch

from engine_service.engine import LLMEngine, TokenLogprob
from engine_service.engine.kv_handoff import KVChunk, PrefillDone
from switchyard.grpc_utils import CHANNEL_OPTIONS
from switchyard.v1 import common_pb2, engine_pb2, engine_pb2_grpc

logger = logging.getLogger(__name__)

# Largest KV payload of one PrefillResponse; a chunk of more blocks is split.
MAX_MESSAGE_KV_BYTES = 4 << 20

_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)
}


def kv_layout(engine: LLMEngine) -> engine_pb2.KVLayout:
    """What an engine's KV blocks are: only engines whose layouts are equal exchange them."""
    return engine_pb2.KVLayout(
        fingerprint=engine.kv_fingerprint,
        block_size=engine.config.block_size,
        dtype=str(engine.dtype).removeprefix("torch."),
        block_shape=list(engine.kv_cache.shape[1:]),
    )


def layout_mismatch(mine: engine_pb2.KVLayout, theirs: engine_pb2.KVLayout) -> str:
    """Why blocks of layout ``theirs`` cannot be used as ``mine`` ("" when they can)."""
    if theirs.block_size != mine.block_size:
        return f"block size {theirs.block_size} against this engine's {mine.block_size}"
    if theirs.dtype != mine.dtype:
        return f"KV dtype {theirs.dtype} against this engine's {mine.dtype}"
    if list(theirs.block_shape) != list(mine.block_shape):
        return (
            f"block shape {tuple(theirs.block_shape)} against this engine's "
            f"{tuple(mine.block_shape)}"
        )
    if theirs.fingerprint != mine.fingerprint:
        return "another model (the KV fingerprints of the checkpoints differ)"
    return ""


def chunk_messages(chunk: KVChunk) -> list[engine_pb2.PrefillResponse]:
    """One chunk of whole blocks as messages of at most :data:`MAX_MESSAGE_KV_BYTES`."""
    blocks = chunk.blocks
    block_bytes = blocks[0].numel() * blocks.element_size()
    per_message = max(1, MAX_MESSAGE_KV_BYTES // block_bytes)
    messages = []
    for start in range(0, blocks.shape[0], per_message):
        part = blocks[start : start + per_message].contiguous()
        messages.append(
            engine_pb2.PrefillResponse(
                first_block=chunk.first_block + start,
                num_blocks=part.shape[0],
                data=part.view(torch.uint8).numpy().tobytes(),
            )
        )
    return messages


def result_message(done: PrefillDone) -> engine_pb2.PrefillResponse:
    result = engine_pb2.PrefillResult(
        token_id=done.token_id,
        generator_state=done.generator_state,
        num_cached_tokens=done.num_cached_tokens,
        prefill_seconds=done.prefill_seconds,
        num_blocks_sent=done.num_blocks_sent,
        bytes_sent=done.bytes_sent,
    )
    if done.logprob is not None:
        result.logprob.CopyFrom(
            common_pb2.TokenLogprob(
                token_id=done.logprob.token_id,
                logprob=done.logprob.logprob,
                top=[common_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in done.logprob.top],
            )
        )
    return engine_pb2.PrefillResponse(result=result)


def blocks_from_message(
    message: engine_pb2.PrefillResponse, layout: engine_pb2.KVLayout
) -> torch.Tensor:
    """The message's blocks as a tensor of this engine's layout; ``ValueError`` when its
    size is not ``num_blocks`` whole blocks."""
    dtype = _DTYPES[layout.dtype]
    shape = (message.num_blocks, *layout.block_shape)
    expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if len(message.data) != expected:
        raise ValueError(
            f"a chunk of {message.num_blocks} blocks carries {len(message.data)} bytes, "
            f"expected {expected}"
        )
    return torch.frombuffer(bytearray(message.data), dtype=dtype).view(shape)


@dataclass(slots=True)
class HandoffOutcome:
    """What one decode-side hand-off did, for metrics: ``ok`` False means the prompt is
    recomputed here (``reason`` says why)."""

    ok: bool
    reason: str = ""
    bytes_received: int = 0
    blocks_received: int = 0
    prefill_seconds: float = 0.0
    handoff_seconds: float = 0.0  # what the hand-off added to the prefill's own time


class PrefillClient:
    """The decode engine's side: channels to prefill engines, and one import per request."""

    def __init__(
        self,
        layout: engine_pb2.KVLayout,
        replica_id: str,
        call: Callable[[Callable[[LLMEngine], object]], asyncio.Future],
        timeout_s: float,
    ) -> None:
        """``call`` runs a function on the engine thread (``EngineLoop.call``)."""
        self._layout = layout
        self._replica_id = replica_id
        self._call = call
        self._timeout_s = timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    def _stub(self, address: str) -> engine_pb2_grpc.EngineServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
        return engine_pb2_grpc.EngineServiceStub(channel)

    async def import_prompt(
        self,
        request: engine_pb2.GenerateRequest,
        engine_request_id: str,
        num_held_blocks: int,
    ) -> HandoffOutcome:
        """Have ``request.prefill_address`` compute the prompt and stream its KV into the
        blocks reserved for ``engine_request_id``; on any failure the request recomputes
        here. Cancellation (the client went away) cancels the Prefill call."""
        address = request.prefill_address
        forwarded = engine_pb2.GenerateRequest()
        forwarded.CopyFrom(request)
        forwarded.prefill_address = ""
        started = time.monotonic()
        call = self._stub(address).Prefill(
            engine_pb2.PrefillRequest(
                request=forwarded,
                layout=self._layout,
                num_skip_blocks=num_held_blocks,
                decode_replica_id=self._replica_id,
            ),
            timeout=self._timeout_s,
        )
        outcome = HandoffOutcome(ok=False)
        try:
            async for message in call:
                if message.num_blocks:
                    blocks = blocks_from_message(message, self._layout)
                    first = message.first_block
                    self._call(lambda e, f=first, b=blocks: e.receive_kv(engine_request_id, f, b))
                    outcome.bytes_received += len(message.data)
                    outcome.blocks_received += message.num_blocks
                if message.HasField("result"):
                    result = message.result
                    logprob = None
                    if result.HasField("logprob"):
                        lp = result.logprob
                        logprob = TokenLogprob(
                            lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top]
                        )
                    finish = functools.partial(
                        LLMEngine.finish_kv_import,
                        request_id=engine_request_id,
                        token_id=result.token_id,
                        logprob=logprob,
                        generator_state=result.generator_state,
                    )
                    finished = await self._call(finish)
                    outcome.ok = bool(finished)
                    outcome.reason = "" if finished else "the blocks received did not fit"
                    outcome.prefill_seconds = result.prefill_seconds
                    elapsed = time.monotonic() - started
                    outcome.handoff_seconds = max(0.0, elapsed - result.prefill_seconds)
                    return outcome
            outcome.reason = "the prefill engine ended the stream without a first token"
        except grpc.aio.AioRpcError as exc:
            outcome.reason = f"{exc.code().name}: {exc.details()}"
        except ValueError as exc:
            outcome.reason = str(exc)
        finally:
            call.cancel()
        logger.warning(
            "KV hand-off failed; recomputing the prompt here",
            extra={"prefill_address": address, "reason": outcome.reason},
        )
        self._call(lambda e: e.fail_kv_import(engine_request_id, outcome.reason))
        return outcome


async def prefill_stream(
    queue: asyncio.Queue[KVChunk | PrefillDone | Exception | object],
) -> AsyncIterator[engine_pb2.PrefillResponse]:
    """The prefill engine's side: the messages of one Prefill call, from the engine's
    hand-off events for the request, until its first token; re-raises an exception put in
    the queue (the request failed or was refused)."""
    while True:
        item = await queue.get()
        if isinstance(item, Exception):
            raise item
        if isinstance(item, KVChunk):
            for message in chunk_messages(item):
                yield message
        elif isinstance(item, PrefillDone):
            yield result_message(item)
            return
        else:  # a RequestOutput: only an abort without a first token matters
            if getattr(item, "finished", False) and getattr(item, "finish_reason", "") == "abort":
                raise RuntimeError("the prefill engine aborted the request")
