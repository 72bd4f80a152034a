"""The one client of the KV service (``kv.proto``): store, find and fetch KV blocks by key.

Engines (through ``engine_service.kv_connector``, which adapts it to the engine core's
``RemoteKVStore``), tests, benchmarks and the KV service's own tools all use this module;
nothing else speaks the protocol. Put streams each block as a header chunk (fingerprint,
hash, size, checksum) followed by data chunks; Get streams them back the same way.

API (async, :class:`KVClient`; create and use it on one event loop)::

    fp = kv_fingerprint(model, dtype, (num_layers, 2, block_size, kv_heads, head_dim))
    client = KVClient("127.0.0.1:50060", timeout_s=2.0)
    stored  = await client.put_blocks(fp, [(block_hash, payload), ...])   # list[bool]
    n       = await client.lookup(fp, chain_hashes)        # leading hashes stored: int
    blocks  = await client.get_blocks(fp, chain_hashes[:n]) # list[bytes | None], in order
    # put_blocks/get_blocks take timeout_s=... to give one large batch a longer deadline
    deleted = await client.delete_blocks(fp, hashes)        # int
    stats   = await client.stats()                          # kv_pb2.StatsResponse | None
    await client.close()

From a thread that is not running an event loop (the engine's offload worker thread),
:class:`KVClientSync` offers the same methods, blocking, and ``submit(coroutine)``, which
returns a ``concurrent.futures.Future`` at once, for I/O that must not stall the caller::

    kv = KVClientSync("127.0.0.1:50060")
    future = kv.submit(kv.client.get_blocks(fp, hashes))   # poll future.done() later
    kv.close()

Keys: ``fp`` is 16 bytes (:func:`switchyard.fingerprint.kv_fingerprint`); each block hash is
16 bytes (:func:`switchyard.block_hash.hash_block`). A payload is any non-empty bytes-like object
(for a block, all its layers' K and V as one contiguous buffer); the service treats it as
opaque. Wrong key lengths or an empty payload raise ``ValueError`` before anything is sent;
that is the only exception the methods raise.

Failures never reach the caller as exceptions and never hang it: every call has a deadline
(``timeout_s``); when the service is down, slow or answers with an error, ``put_blocks``
answers all ``False``, ``lookup`` 0, ``get_blocks`` all ``None``, ``delete_blocks`` 0 and
``stats`` ``None``, and the client logs it once. After a failure the client does not call the
service for ``retry_after_s`` (calls return the same misses at once), then tries again and
logs once when it answers. :attr:`KVClient.available`, :attr:`KVClient.last_error` and
:attr:`KVClient.num_failures` tell a caller whether its last answer was a real one. Payloads are checked against their checksum on arrival; one that
fails is a miss.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from switchyard.block_hash import BLOCK_HASH_BYTES
from switchyard.fingerprint import FINGERPRINT_BYTES
from switchyard.grpc_utils import CHANNEL_OPTIONS
from switchyard.v1 import kv_pb2, kv_pb2_grpc

__all__ = ["CHECKSUM_BYTES", "KVClient", "KVClientSync", "payload_checksum"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Payload = bytes | bytearray | memoryview

CHECKSUM_BYTES = 16

# Reconnect quickly once the service is back (gRPC's default backoff grows to 120 s).
_CLIENT_CHANNEL_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def payload_checksum(payload: Payload) -> bytes:
    """The protocol's checksum of a block's payload: blake2b with a 16-byte digest, computed
    by the writer and verified by the service and by readers."""
    return hashlib.blake2b(payload, digest_size=CHECKSUM_BYTES).digest()


def _check_keys(fingerprint: bytes, block_hashes: Sequence[bytes]) -> None:
    if len(fingerprint) != FINGERPRINT_BYTES:
        raise ValueError(f"fingerprint must be {FINGERPRINT_BYTES} bytes, got {len(fingerprint)}")
    for block_hash in block_hashes:
        if len(block_hash) != BLOCK_HASH_BYTES:
            raise ValueError(f"block hash must be {BLOCK_HASH_BYTES} bytes, got {len(block_hash)}")


class KVClient:
    """Async client of one KV service at ``address`` (``host:port``); see the module
    docstring. Create and use it on one event loop."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 2.0,
        retry_after_s: float = 1.0,
        chunk_bytes: int = 1 << 20,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.chunk_bytes = chunk_bytes
        self.num_failures = 0
        self.last_error: str | None = None  # the latest failure, "Method: CODE details"
        self._channel = grpc.aio.insecure_channel(address, options=_CLIENT_CHANNEL_OPTIONS)
        self._stub = kv_pb2_grpc.KVServiceStub(self._channel)
        self._down_since: float | None = None
        self._retry_at = 0.0

    @property
    def available(self) -> bool:
        """False from a failed call until a call succeeds again."""
        return self._down_since is None

    def _skip(self) -> bool:
        return self._down_since is not None and time.monotonic() < self._retry_at

    def _failed(self, method: str, exc: grpc.aio.AioRpcError | str) -> None:
        reason = exc if isinstance(exc, str) else f"{exc.code().name} {exc.details()}"
        self.num_failures += 1
        self.last_error = f"{method}: {reason}"
        self._retry_at = time.monotonic() + self.retry_after_s
        if self._down_since is None:
            self._down_since = time.monotonic()
            logger.warning(
                "KV service %s failed %s (%s); answering misses, retrying every %.1fs",
                self.address,
                method,
                reason,
                self.retry_after_s,
            )

    def _succeeded(self) -> None:
        if self._down_since is not None:
            logger.info(
                "KV service %s answers again after %.1fs",
                self.address,
                time.monotonic() - self._down_since,
            )
            self._down_since = None

    async def put_blocks(
        self,
        fingerprint: bytes,
        blocks: Sequence[tuple[bytes, Payload]],
        timeout_s: float | None = None,
    ) -> list[bool]:
        """Stores ``(block_hash, payload)`` pairs; per block, whether the service kept it.
        ``timeout_s`` overrides the client's deadline for this call (large batches)."""
        _check_keys(fingerprint, [block_hash for block_hash, _ in blocks])
        if any(memoryview(payload).nbytes == 0 for _, payload in blocks):
            raise ValueError("a block's payload must not be empty")
        refused = [False] * len(blocks)
        if not blocks or self._skip():
            return refused
        try:
            reply = await self._stub.Put(
                self._chunks(fingerprint, blocks), timeout=timeout_s or self.timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            self._failed("Put", exc)
            return refused
        self._succeeded()
        return list(reply.stored)

    def _chunks(
        self, fingerprint: bytes, blocks: Sequence[tuple[bytes, Payload]]
    ) -> Iterator[kv_pb2.PutChunk]:
        for block_hash, payload in blocks:
            view = memoryview(payload).cast("B")
            header = kv_pb2.BlockHeader(
                fingerprint=fingerprint,
                block_hash=block_hash,
                size=len(view),
                checksum=payload_checksum(view),
            )
            for offset in range(0, len(view), self.chunk_bytes):
                data = bytes(view[offset : offset + self.chunk_bytes])
                if offset == 0:
                    yield kv_pb2.PutChunk(header=header, data=data)
                else:
                    yield kv_pb2.PutChunk(data=data, offset=offset)

    async def lookup(self, fingerprint: bytes, block_hashes: Sequence[bytes]) -> int:
        """How many leading hashes of the chain ``block_hashes`` the service holds."""
        _check_keys(fingerprint, block_hashes)
        if not block_hashes or self._skip():
            return 0
        request = kv_pb2.LookupRequest(fingerprint=fingerprint, block_hashes=block_hashes)
        try:
            reply = await self._stub.Lookup(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            self._failed("Lookup", exc)
            return 0
        self._succeeded()
        return reply.num_present

    async def get_blocks(
        self, fingerprint: bytes, block_hashes: Sequence[bytes], timeout_s: float | None = None
    ) -> list[bytes | None]:
        """The payloads of ``block_hashes`` in order; ``None`` for each one not returned
        whole and intact. ``timeout_s`` overrides the client's deadline for this call."""
        _check_keys(fingerprint, block_hashes)
        payloads: list[bytes | None] = [None] * len(block_hashes)
        if not block_hashes or self._skip():
            return payloads
        request = kv_pb2.GetRequest(fingerprint=fingerprint, block_hashes=block_hashes)
        index = -1
        header: kv_pb2.BlockHeader | None = None
        received = bytearray()
        try:
            async for chunk in self._stub.Get(request, timeout=timeout_s or self.timeout_s):
                if chunk.HasField("header"):
                    index += 1
                    if index >= len(block_hashes):
                        break
                    expected = block_hashes[index]
                    found = chunk.found and chunk.header.block_hash == expected
                    header = chunk.header if found else None
                    received = bytearray()
                if header is None or chunk.offset != len(received):
                    continue
                received += chunk.data
                if len(received) == header.size:
                    if payload_checksum(received) == header.checksum:
                        payloads[index] = bytes(received)
                    else:
                        logger.warning("KV block %s failed its checksum", header.block_hash.hex())
                    header = None
        except grpc.aio.AioRpcError as exc:
            self._failed("Get", exc)
            return [None] * len(block_hashes)
        self._succeeded()
        return payloads

    async def delete_blocks(self, fingerprint: bytes, block_hashes: Sequence[bytes]) -> int:
        """Removes the blocks from every tier; how many were stored."""
        _check_keys(fingerprint, block_hashes)
        if not block_hashes or self._skip():
            return 0
        request = kv_pb2.DeleteRequest(fingerprint=fingerprint, block_hashes=block_hashes)
        try:
            reply = await self._stub.Delete(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            self._failed("Delete", exc)
            return 0
        self._succeeded()
        return reply.num_deleted

    async def stats(self) -> kv_pb2.StatsResponse | None:
        """The service's per-tier figures, or ``None`` when it does not answer."""
        if self._skip():
            return None
        try:
            reply = await self._stub.Stats(kv_pb2.StatsRequest(), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            self._failed("Stats", exc)
            return None
        self._succeeded()
        return reply

    async def close(self) -> None:
        await self._channel.close()


class KVClientSync:
    """A :class:`KVClient` on a private event-loop thread, for callers without a loop.

    Blocking methods mirror the async ones and return within the client's deadline (plus a
    second of slack, after which they give up and return the miss answer). Do not call them
    from a thread that runs an event loop; use :class:`KVClient` there.
    """

    def __init__(self, address: str, **client_options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kv-client", daemon=True
        )
        self._thread.start()

        async def create() -> KVClient:
            return KVClient(address, **client_options)

        self.client: KVClient = asyncio.run_coroutine_threadsafe(create(), self._loop).result()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Runs a coroutine of :attr:`client` on the client's loop; returns at once."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _wait(
        self, coroutine: Coroutine[Any, Any, T], miss: T, timeout_s: float | None = None
    ) -> T:
        future = self.submit(coroutine)
        limit_s = (timeout_s or self.client.timeout_s) + 1.0
        try:
            return future.result(timeout=limit_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            # The call's own deadline did not fire: the client's loop is stuck. Count it as
            # a failure, so that ``available`` tells the caller this answer is a miss.
            self.client._failed(coroutine.__qualname__, f"no answer within {limit_s:.1f}s")
            return miss

    def put_blocks(
        self,
        fingerprint: bytes,
        blocks: Sequence[tuple[bytes, Payload]],
        timeout_s: float | None = None,
    ) -> list[bool]:
        coroutine = self.client.put_blocks(fingerprint, blocks, timeout_s)
        return self._wait(coroutine, [False] * len(blocks), timeout_s)

    def lookup(self, fingerprint: bytes, block_hashes: Sequence[bytes]) -> int:
        return self._wait(self.client.lookup(fingerprint, block_hashes), 0)

    def get_blocks(
        self, fingerprint: bytes, block_hashes: Sequence[bytes], timeout_s: float | None = None
    ) -> list[bytes | None]:
        miss: list[bytes | None] = [None] * len(block_hashes)
        coroutine = self.client.get_blocks(fingerprint, block_hashes, timeout_s)
        return self._wait(coroutine, miss, timeout_s)

    def delete_blocks(self, fingerprint: bytes, block_hashes: Sequence[bytes]) -> int:
        return self._wait(self.client.delete_blocks(fingerprint, block_hashes), 0)

    def stats(self) -> kv_pb2.StatsResponse | None:
        return self._wait(self.client.stats(), None)

    def close(self) -> None:
        """Closes the channel and stops the loop thread."""
        asyncio.run_coroutine_threadsafe(self.client.close(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()
