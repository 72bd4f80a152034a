"""How a KV block is addressed and checked, shared by the service and its stores.

A block's key is ``fingerprint + block_hash`` (16 + 16 bytes). The fingerprint
(:func:`switchyard.fingerprint.kv_fingerprint`) names what the bytes mean: model, dtype, KV
block shape; the block hash (:func:`switchyard.block_hash.hash_block`) is the chained hash of
the tokens and the request's extra keys (adapter, cache salt, media:
:func:`switchyard.block_hash.block_extra_keys`). Two models never share a fingerprint, so a
lookup under one model's fingerprint never finds another model's block, and two adapters or
salts never share a block hash. The payload carries a blake2b-128 checksum
(:func:`switchyard.kv_client.payload_checksum`) computed by the writer and verified on every
read.
"""

from __future__ import annotations

from dataclasses import dataclass

from switchyard.block_hash import BLOCK_HASH_BYTES
from switchyard.fingerprint import FINGERPRINT_BYTES
from switchyard.kv_client import CHECKSUM_BYTES, payload_checksum

__all__ = [
    "BLOCK_HASH_BYTES",
    "CHECKSUM_BYTES",
    "FINGERPRINT_BYTES",
    "Block",
    "BlockKey",
    "payload_checksum",
]


@dataclass(frozen=True, slots=True)
class BlockKey:
    """A block's address. Raises ``ValueError`` when a part has the wrong length."""

    fingerprint: bytes
    block_hash: bytes

    def __post_init__(self) -> None:
        if len(self.fingerprint) != FINGERPRINT_BYTES:
            raise ValueError(
                f"fingerprint must be {FINGERPRINT_BYTES} bytes, got {len(self.fingerprint)}"
            )
        if len(self.block_hash) != BLOCK_HASH_BYTES:
            raise ValueError(
                f"block hash must be {BLOCK_HASH_BYTES} bytes, got {len(self.block_hash)}"
            )

    @property
    def raw(self) -> bytes:
        """The 32-byte key the stores index by."""
        return self.fingerprint + self.block_hash

    @property
    def hex(self) -> str:
        return self.raw.hex()


@dataclass(frozen=True, slots=True)
class Block:
    """A block's payload and the checksum its writer computed over it."""

    key: BlockKey
    payload: bytes
    checksum: bytes

    @classmethod
    def of(cls, key: BlockKey, payload: bytes) -> Block:
        return cls(key, payload, payload_checksum(payload))

    def checksum_ok(self) -> bool:
        return payload_checksum(self.payload) == self.checksum
