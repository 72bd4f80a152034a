"""The store interface every backend implements, its counters, and the on-disk/in-Redis
record format.

A record is a fixed header followed by the payload::

    offset 0     4        5     8           16            32                  64
           | SYKV | version | pad | payload len | checksum (16) | key: fp + hash (32) | payload ...

Reading a record checks all of it: magic, version, that the key is the one asked for, that
the length matches the bytes present (a truncated record is caught here) and that the
payload's checksum matches (a flipped bit is caught here).
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from kv_service.keys import Block, BlockKey

RECORD_MAGIC = b"SYKV"
RECORD_VERSION = 1
_HEADER = struct.Struct("<4sB3xQ16s32s")
RECORD_HEADER_BYTES = _HEADER.size


class CorruptRecord(ValueError):
    """A stored record failed its magic, key, length or checksum check."""


def encode_record(block: Block) -> bytes:
    header = _HEADER.pack(
        RECORD_MAGIC, RECORD_VERSION, len(block.payload), block.checksum, block.key.raw
    )
    return header + block.payload


def decode_record(key: BlockKey, record: bytes) -> Block:
    """The block in ``record``; raises :class:`CorruptRecord` unless every check passes."""
    if len(record) < RECORD_HEADER_BYTES:
        raise CorruptRecord(f"record of {len(record)} bytes is shorter than its header")
    magic, version, size, checksum, raw_key = _HEADER.unpack_from(record)
    if magic != RECORD_MAGIC or version != RECORD_VERSION:
        raise CorruptRecord("bad magic or version")
    if raw_key != key.raw:
        raise CorruptRecord("record holds another key")
    if len(record) - RECORD_HEADER_BYTES != size:
        raise CorruptRecord(f"payload is {len(record) - RECORD_HEADER_BYTES} bytes, not {size}")
    block = Block(key, record[RECORD_HEADER_BYTES:], checksum)
    if not block.checksum_ok():
        raise CorruptRecord("checksum mismatch")
    return block


@dataclass(slots=True)
class TierStats:
    """One tier's counters since start (``hits`` .. ``bytes_written``) and usage now."""

    tier: str
    hits: int = 0
    misses: int = 0
    corrupt_blocks: int = 0
    evictions: int = 0
    refused_writes: int = 0
    errors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    blocks: int = 0
    bytes_used: int = 0
    capacity_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        reads = self.hits + self.misses
        return self.hits / reads if reads else 0.0


class KVStore(ABC):
    """A bounded, content-addressed block store; one tier or a composition of tiers.

    Contract:

    - A key names immutable content: putting a key that is present keeps the stored copy
      (and counts as a use for eviction).
    - ``put_many`` answers, per block, whether it is stored now. ``False`` means refused (larger
      than the store, the store is full of blocks it may not evict, or the backend failed); a
      refused block leaves nothing behind, and a half-written record is never readable.
    - ``get_many`` answers, per key, the block or ``None``. ``None`` is a miss for any reason:
      absent, evicted, expired, corrupt (which is also counted and deleted), or the backend
      being unreachable. Reads never raise for backend failures; the caller recomputes.
    - ``lookup`` counts the leading keys of a chain that are present. It checks presence
      only, so a later ``get_many`` may still miss (evicted meanwhile, or corrupt).
    - Every method is safe to call from several threads at once; none blocks on the event
      loop (the service calls them through ``asyncio.to_thread``).
    """

    @property
    @abstractmethod
    def spec(self) -> str:
        """What this store is, as ``--kv-store`` would name it (``disk:/data/kv``)."""

    @abstractmethod
    def put_many(self, blocks: Sequence[Block]) -> list[bool]: ...

    @abstractmethod
    def get_many(self, keys: Sequence[BlockKey]) -> list[Block | None]: ...

    @abstractmethod
    def lookup(self, keys: Sequence[BlockKey]) -> int: ...

    @abstractmethod
    def delete_many(self, keys: Sequence[BlockKey]) -> int:
        """Remove the keys that are present; returns how many were."""

    @abstractmethod
    def stats(self) -> list[TierStats]:
        """One entry per tier, top tier first."""

    def close(self) -> None:  # noqa: B027 - most stores hold nothing to release
        """Release connections and files; the store is unusable afterwards."""
