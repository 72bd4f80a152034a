"""The engine's link to the KV service: the shared client as the core's :class:`RemoteKVStore`.

The engine core defines what a remote store is and calls it from its offload worker thread
only, so this adapter wraps the blocking :class:`~switchyard.kv_client.KVClientSync`. The
client answers a failed call (the service down, slow, or answering an error) with misses;
here such an answer becomes :class:`RemoteUnavailable`, on which the core serves from its
local tiers, recomputes, and backs off before trying again. The core owns that backoff, so
the client is told never to skip calls on its own. Each rank of a parallel engine opens its
own client (:meth:`KVServiceStore.reopen_spec`).
"""

from __future__ import annotations

from typing import Any, TypeVar

from engine_service.engine.offload import RemoteKVStore, RemoteUnavailable
from switchyard.kv_client import KVClientSync

T = TypeVar("T")


class KVServiceStore(RemoteKVStore):
    """The KV service at ``address`` (``host:port``); calls give up after ``timeout_s``."""

    def __init__(self, address: str, timeout_s: float = 2.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._kv = KVClientSync(address, timeout_s=timeout_s, retry_after_s=0.0)

    def close(self) -> None:
        self._kv.close()

    def reopen_spec(self) -> tuple[str, dict[str, Any]]:
        """Every rank of a parallel engine opens a client of its own to the same service."""
        return f"{__name__}:{type(self).__name__}", {
            "address": self.address,
            "timeout_s": self.timeout_s,
        }

    def lookup(self, fingerprint: bytes, block_hashes: list[bytes]) -> int:
        return self._answered(self._kv.lookup(fingerprint, block_hashes))

    def get(self, fingerprint: bytes, block_hashes: list[bytes]) -> list[bytes | None]:
        return self._answered(self._kv.get_blocks(fingerprint, block_hashes))

    def put(self, fingerprint: bytes, blocks: list[tuple[bytes, bytes]]) -> int:
        return sum(self._answered(self._kv.put_blocks(fingerprint, blocks)))

    def _answered(self, answer: T) -> T:
        """``answer`` if the service gave it; RemoteUnavailable if it is the client's miss."""
        if not self._kv.client.available:
            raise RemoteUnavailable(self._kv.client.last_error or f"{self.address}: no answer")
        return answer
