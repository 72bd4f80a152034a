"""How a KV block is addressed and checked, shared by the service, its stores and its client.

A block's key is ``fingerprint + block_hash`` (16 + 16 bytes). The fingerprint names what the
bytes mean (model, adapter, dtype, KV layout); the block hash is the engine's chained hash of
the tokens (``engine_service.engine.kv_cache.hash_block``). Two models never share a
fingerprint, so a lookup under one model's fingerprint never finds another model's block.
The payload carries a blake2b-128 checksum computed by the writer and verified on every read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

FINGERPRINT_BYTES = 16
BLOCK_HASH_BYTES = 16
CHECKSUM_BYTES = 16


def block_fingerprint(model: str, adapter: str, dtype: str, layout: Sequence[int]) -> bytes:
    """The 16-byte fingerprint of blocks written by ``model`` (plus LoRA ``adapter``, empty for
    none) in ``dtype`` with one block shaped ``layout``, e.g.
    ``(num_layers, 2, block_size, num_kv_heads, head_dim)``."""
    digest = hashlib.blake2b(digest_size=FINGERPRINT_BYTES, person=b"switchyard-kvfp")
    for part in (model, adapter, dtype, ",".join(str(int(d)) for d in layout)):
        encoded = part.encode()
        digest.update(len(encoded).to_bytes(4, "little"))
        digest.update(encoded)
    return digest.digest()


def payload_checksum(payload: bytes | bytearray | memoryview) -> bytes:
    """blake2b with a 16-byte digest of a block's payload."""
    return hashlib.blake2b(payload, digest_size=CHECKSUM_BYTES).digest()


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
