"""The KV service: ``KVService`` over a :class:`KVStore`, with health and ``/metrics``.

Handlers run on the event loop and hand every store call to a worker thread
(``asyncio.to_thread``), so a slow disk or Redis never stalls other calls. Each request is
checked at the boundary: keys of the wrong length, chunks larger than ``max_chunk_bytes``,
blocks larger than ``max_block_bytes``, chunks out of order or a stream that ends inside a
block end that one call with INVALID_ARGUMENT; a payload whose checksum does not match its
header ends it with DATA_LOSS. Nothing a caller sends can stop the service.

Put streams are stored in batches of about ``PUT_BATCH_BYTES`` (one pipelined round trip to
Redis per batch), Gets are read in batches of ``GET_BATCH_BLOCKS`` and sent in chunks of
``GET_CHUNK_BYTES``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import NoReturn

import grpc
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kv_service.keys import CHECKSUM_BYTES, Block, BlockKey
from kv_service.stores import KVStore, TierStats, open_store
from switchyard.grpc_utils import GrpcServer, create_server, serve_until_signalled
from switchyard.metrics import MetricsServer, start_metrics_server
from switchyard.settings import KVServiceSettings
from switchyard.v1 import kv_pb2, kv_pb2_grpc

logger = logging.getLogger(__name__)

KV_SERVICE_NAME = kv_pb2.DESCRIPTOR.services_by_name["KVService"].full_name
MAX_KEYS_PER_REQUEST = 16384
PUT_BATCH_BYTES = 16 << 20
GET_BATCH_BLOCKS = 16
GET_CHUNK_BYTES = 1 << 20
SHUTDOWN_GRACE_S = 5.0


class ChecksumMismatch(ValueError):
    """A block's bytes do not match the checksum its header declared."""


# ---------------------------------------------------------------------------------------------
# Metrics


_TIER_COUNTERS = (
    ("hits", "Blocks found in the tier."),
    ("misses", "Blocks asked of the tier and not found there."),
    ("corrupt_blocks", "Blocks that failed their checksum or length check; deleted."),
    ("evictions", "Blocks evicted to make room."),
    ("refused_writes", "Blocks the tier refused to store (full, too large, write error)."),
    ("errors", "Backend failures: I/O errors, Redis unreachable."),
    ("bytes_read", "Bytes of blocks read from the tier."),
    ("bytes_written", "Bytes of blocks written to the tier."),
)
_TIER_GAUGES = (
    ("blocks", "Blocks stored in the tier."),
    ("bytes_used", "Bytes the tier uses."),
    ("capacity_bytes", "Bytes the tier may use (0: bounded by the backend itself)."),
)


class _StoreCollector(Collector):
    """Exports every tier's :class:`TierStats`, labelled by tier, and the blocks the service
    served, at scrape time."""

    def __init__(self, stats: Callable[[], list[TierStats]], served: ServedBlocks) -> None:
        self._stats = stats
        self._served = served

    def collect(self) -> Iterator[Metric]:
        tiers = self._stats()
        for name, doc in _TIER_COUNTERS:
            counter = CounterMetricFamily(f"switchyard_kv_{name}", doc, labels=["tier"])
            for tier in tiers:
                counter.add_metric([tier.tier], getattr(tier, name))
            yield counter
        for name, doc in _TIER_GAUGES:
            gauge = GaugeMetricFamily(f"switchyard_kv_{name}", doc, labels=["tier"])
            for tier in tiers:
                gauge.add_metric([tier.tier], getattr(tier, name))
            yield gauge
        yield CounterMetricFamily(
            "switchyard_kv_block_hits", "Blocks a Get found in any tier.", self._served.hits
        )
        yield CounterMetricFamily(
            "switchyard_kv_block_misses", "Blocks a Get found in no tier.", self._served.misses
        )


@dataclass(slots=True)
class ServedBlocks:
    """Blocks the service's Gets found (in any tier) and did not find."""

    hits: int = 0
    misses: int = 0


class KVMetrics:
    """The service's registry: per-tier figures, blocks served, and rejected calls."""

    def __init__(self, store: KVStore) -> None:
        self.served = ServedBlocks()
        self.registry = CollectorRegistry()
        self.registry.register(_StoreCollector(store.stats, self.served))
        self.rejected = Counter(
            "switchyard_kv_rejected_requests",
            "Calls ended with an error because of what the caller sent.",
            ["rpc", "code"],
            registry=self.registry,
        )


# ---------------------------------------------------------------------------------------------
# The gRPC service


def _keys(fingerprint: bytes, block_hashes: list[bytes]) -> list[BlockKey]:
    if len(block_hashes) > MAX_KEYS_PER_REQUEST:
        raise ValueError(f"at most {MAX_KEYS_PER_REQUEST} block hashes per request")
    return [BlockKey(fingerprint, block_hash) for block_hash in block_hashes]


@dataclass(slots=True)
class _IncomingBlock:
    """A Put block whose header arrived and whose bytes are still arriving."""

    key: BlockKey
    size: int
    checksum: bytes
    payload: bytearray = field(default_factory=bytearray)


class KVServicer(kv_pb2_grpc.KVServiceServicer):
    """``KVService`` over ``store``; runs on the event loop, the store in worker threads."""

    def __init__(
        self, store: KVStore, metrics: KVMetrics, max_chunk_bytes: int, max_block_bytes: int
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.max_chunk_bytes = max_chunk_bytes
        self.max_block_bytes = max_block_bytes

    async def _reject(
        self, context: grpc.aio.ServicerContext, rpc: str, exc: ValueError
    ) -> NoReturn:
        """Ends the call with INVALID_ARGUMENT (DATA_LOSS for a checksum mismatch)."""
        code = (
            grpc.StatusCode.DATA_LOSS
            if isinstance(exc, ChecksumMismatch)
            else grpc.StatusCode.INVALID_ARGUMENT
        )
        self.metrics.rejected.labels(rpc, code.name).inc()
        logger.info("%s rejected: %s", rpc, exc, extra={"peer": context.peer()})
        await context.abort(code, str(exc))
        raise AssertionError("context.abort returned")  # it raises; this satisfies NoReturn

    def _start_block(self, header: kv_pb2.BlockHeader) -> _IncomingBlock:
        key = BlockKey(header.fingerprint, header.block_hash)
        if not 0 < header.size <= self.max_block_bytes:
            raise ValueError(f"block size {header.size} is not in 1..{self.max_block_bytes}")
        if len(header.checksum) != CHECKSUM_BYTES:
            raise ValueError(f"checksum must be a {CHECKSUM_BYTES}-byte blake2b digest")
        return _IncomingBlock(key, header.size, header.checksum)

    def _add_chunk(self, block: _IncomingBlock, chunk: kv_pb2.PutChunk) -> Block | None:
        """Appends ``chunk``; returns the finished block once all its bytes arrived."""
        if len(chunk.data) > self.max_chunk_bytes:
            raise ValueError(f"chunk of {len(chunk.data)} bytes exceeds {self.max_chunk_bytes}")
        if chunk.offset != len(block.payload):
            raise ValueError(
                f"chunk at offset {chunk.offset}, expected {len(block.payload)} (out of order)"
            )
        if len(block.payload) + len(chunk.data) > block.size:
            raise ValueError(f"more bytes than the {block.size} the header declared")
        block.payload += chunk.data
        if len(block.payload) < block.size:
            return None
        finished = Block(block.key, bytes(block.payload), block.checksum)
        if not finished.checksum_ok():
            raise ChecksumMismatch(f"block {block.key.block_hash.hex()}: checksum mismatch")
        return finished

    async def Put(
        self, request_iterator: AsyncIterator[kv_pb2.PutChunk], context: grpc.aio.ServicerContext
    ) -> kv_pb2.PutResponse:
        stored: list[bool] = []
        batch: list[Block] = []
        batch_bytes = 0
        incoming: _IncomingBlock | None = None
        try:
            async for chunk in request_iterator:
                if chunk.HasField("header"):
                    if incoming is not None:
                        raise ValueError("a new block's header arrived before the last block ended")
                    incoming = self._start_block(chunk.header)
                elif incoming is None:
                    raise ValueError("the first chunk of a block must carry its header")
                finished = self._add_chunk(incoming, chunk)
                if finished is None:
                    continue
                incoming = None
                batch.append(finished)
                batch_bytes += len(finished.payload)
                if batch_bytes >= PUT_BATCH_BYTES:
                    stored += await asyncio.to_thread(self.store.put_many, batch)
                    batch, batch_bytes = [], 0
            if incoming is not None:
                raise ValueError("the stream ended inside a block")
        except ValueError as exc:
            await self._reject(context, "Put", exc)
        stored += await asyncio.to_thread(self.store.put_many, batch)
        return kv_pb2.PutResponse(stored=stored)

    async def Get(
        self, request: kv_pb2.GetRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kv_pb2.GetChunk]:
        try:
            keys = _keys(request.fingerprint, list(request.block_hashes))
        except ValueError as exc:
            await self._reject(context, "Get", exc)
        for start in range(0, len(keys), GET_BATCH_BLOCKS):
            batch = keys[start : start + GET_BATCH_BLOCKS]
            for key, block in zip(batch, await asyncio.to_thread(self.store.get_many, batch)):
                header = kv_pb2.BlockHeader(fingerprint=key.fingerprint, block_hash=key.block_hash)
                if block is None:
                    self.metrics.served.misses += 1
                    yield kv_pb2.GetChunk(header=header, found=False)
                    continue
                self.metrics.served.hits += 1
                header.size = len(block.payload)
                header.checksum = block.checksum
                payload = memoryview(block.payload)
                for offset in range(0, len(payload), GET_CHUNK_BYTES):
                    data = bytes(payload[offset : offset + GET_CHUNK_BYTES])
                    if offset == 0:
                        yield kv_pb2.GetChunk(header=header, found=True, data=data)
                    else:
                        yield kv_pb2.GetChunk(data=data, offset=offset)

    async def Lookup(
        self, request: kv_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> kv_pb2.LookupResponse:
        try:
            keys = _keys(request.fingerprint, list(request.block_hashes))
        except ValueError as exc:
            await self._reject(context, "Lookup", exc)
        num_present = await asyncio.to_thread(self.store.lookup, keys)
        return kv_pb2.LookupResponse(num_present=num_present)

    async def Delete(
        self, request: kv_pb2.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> kv_pb2.DeleteResponse:
        try:
            keys = _keys(request.fingerprint, list(request.block_hashes))
        except ValueError as exc:
            await self._reject(context, "Delete", exc)
        num_deleted = await asyncio.to_thread(self.store.delete_many, keys)
        return kv_pb2.DeleteResponse(num_deleted=num_deleted)

    async def Stats(
        self, request: kv_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> kv_pb2.StatsResponse:
        tiers = await asyncio.to_thread(self.store.stats)
        return kv_pb2.StatsResponse(
            store=self.store.spec,
            tiers=[
                kv_pb2.TierStats(
                    tier=tier.tier,
                    hits=tier.hits,
                    misses=tier.misses,
                    hit_rate=tier.hit_rate,
                    corrupt_blocks=tier.corrupt_blocks,
                    evictions=tier.evictions,
                    refused_writes=tier.refused_writes,
                    errors=tier.errors,
                    bytes_read=tier.bytes_read,
                    bytes_written=tier.bytes_written,
                    blocks=tier.blocks,
                    bytes_used=tier.bytes_used,
                    capacity_bytes=tier.capacity_bytes,
                )
                for tier in tiers
            ],
            block_hits=self.metrics.served.hits,
            block_misses=self.metrics.served.misses,
        )


# ---------------------------------------------------------------------------------------------
# The server


class KVServer:
    """The service process's parts: store, gRPC server (with health) and ``/metrics``.
    ``start`` then ``stop``; ``port`` and ``metrics_port`` are the bound ports once started."""

    def __init__(self, settings: KVServiceSettings) -> None:
        self.settings = settings
        self.port = 0
        self.metrics_port = 0
        self.store: KVStore | None = None
        self._grpc: GrpcServer | None = None
        self._metrics_server: MetricsServer | None = None

    async def start(self) -> None:
        settings = self.settings
        # Opening a disk store re-indexes its folder: off the event loop.
        store = await asyncio.to_thread(
            open_store,
            settings.kv_store,
            memory_bytes=settings.kv_memory_bytes,
            disk_bytes=settings.kv_disk_bytes,
            redis_ttl_s=settings.kv_redis_ttl_s,
            default_disk_dir=settings.data_dir / "kv",
        )
        self.store = store
        metrics = KVMetrics(store)
        grpc_server = create_server(settings.host, settings.port, [KV_SERVICE_NAME])
        self._grpc = grpc_server
        self.port = grpc_server.port
        servicer = KVServicer(store, metrics, settings.max_chunk_bytes, settings.max_block_bytes)
        kv_pb2_grpc.add_KVServiceServicer_to_server(servicer, grpc_server.server)
        self._metrics_server = start_metrics_server(
            settings.metrics_port, metrics.registry, settings.host
        )
        self.metrics_port = self._metrics_server.port
        await grpc_server.start()
        await grpc_server.set_serving(True)
        logger.info(
            "kv service serving",
            extra={"store": store.spec, "port": self.port, "metrics_port": self.metrics_port},
        )

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """NOT_SERVING, let calls finish for ``grace_s`` (then cancel), close the store."""
        if self._grpc is not None:
            await self._grpc.set_serving(False)
            await self._grpc.stop(grace_s)
        if self._metrics_server is not None:
            self._metrics_server.stop()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
        logger.info("kv service stopped")


async def serve(settings: KVServiceSettings) -> None:
    """Run the service until SIGTERM or SIGINT, then stop it gracefully."""
    server = KVServer(settings)
    await serve_until_signalled(server.start, server.stop)
