"""The engine's link to the KV service: :class:`RemoteKVStore` over ``KVService`` gRPC.

The engine core defines what a remote store is and calls it from its offload worker thread
only, so this connector is plain blocking gRPC (a synchronous channel) with a deadline on
every call. Any failure (the service down, slow, or answering an error) becomes
:class:`RemoteUnavailable`; the core then serves from its local tiers and recomputes, and
backs off before trying again.

The wire format is ``kv.proto``'s: Put streams each block as a header chunk (fingerprint,
hash, size, blake2b-128 checksum) followed by data chunks; Get streams them back the same
way. A block that arrives short or with a wrong checksum is a miss.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import grpc

from engine_service.engine.offload import RemoteKVStore, RemoteUnavailable
from switchyard.grpc_utils import CHANNEL_OPTIONS
from switchyard.v1 import kv_pb2, kv_pb2_grpc

CHUNK_BYTES = 1 << 20

# Reconnect quickly once the service is back (gRPC's default backoff grows to 120 s).
_CHANNEL_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def _checksum(payload: bytes | bytearray) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()


class GrpcKVStore(RemoteKVStore):
    """The KV service at ``address`` (``host:port``); calls give up after ``timeout_s``."""

    def __init__(self, address: str, timeout_s: float = 2.0) -> None:
        self.address = address
        self._timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = kv_pb2_grpc.KVServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def lookup(self, fingerprint: bytes, block_hashes: list[bytes]) -> int:
        request = kv_pb2.LookupRequest(fingerprint=fingerprint, block_hashes=block_hashes)
        try:
            return self._stub.Lookup(request, timeout=self._timeout_s).num_present
        except grpc.RpcError as exc:
            raise RemoteUnavailable(_describe("Lookup", exc)) from exc

    def get(self, fingerprint: bytes, block_hashes: list[bytes]) -> list[bytes | None]:
        payloads: list[bytes | None] = [None] * len(block_hashes)
        request = kv_pb2.GetRequest(fingerprint=fingerprint, block_hashes=block_hashes)
        index = -1
        header: kv_pb2.BlockHeader | None = None
        received = bytearray()
        try:
            for chunk in self._stub.Get(request, timeout=self._timeout_s):
                if chunk.HasField("header"):
                    index += 1
                    if index >= len(block_hashes):
                        break
                    wanted = chunk.found and chunk.header.block_hash == block_hashes[index]
                    header = chunk.header if wanted else None
                    received = bytearray()
                if header is None or chunk.offset != len(received):
                    continue
                received += chunk.data
                if len(received) == header.size:
                    if _checksum(received) == header.checksum:
                        payloads[index] = bytes(received)
                    header = None
        except grpc.RpcError as exc:
            raise RemoteUnavailable(_describe("Get", exc)) from exc
        return payloads

    def put(self, fingerprint: bytes, blocks: list[tuple[bytes, bytes]]) -> int:
        try:
            reply = self._stub.Put(_put_chunks(fingerprint, blocks), timeout=self._timeout_s)
        except grpc.RpcError as exc:
            raise RemoteUnavailable(_describe("Put", exc)) from exc
        return sum(reply.stored)


def _put_chunks(fingerprint: bytes, blocks: list[tuple[bytes, bytes]]) -> Iterator[kv_pb2.PutChunk]:
    for block_hash, payload in blocks:
        header = kv_pb2.BlockHeader(
            fingerprint=fingerprint,
            block_hash=block_hash,
            size=len(payload),
            checksum=_checksum(payload),
        )
        for offset in range(0, len(payload), CHUNK_BYTES):
            data = payload[offset : offset + CHUNK_BYTES]
            if offset == 0:
                yield kv_pb2.PutChunk(header=header, data=data)
            else:
                yield kv_pb2.PutChunk(data=data, offset=offset)


def _describe(method: str, exc: grpc.RpcError) -> str:
    if isinstance(exc, grpc.Call):
        return f"{method}: {exc.code().name} {exc.details()}"
    return f"{method}: {exc}"
