"""Prefix-cache-aware routing: send a request where its prompt's prefix is already cached.

The replica holding the longest prefix of the prompt (per the :class:`PrefixIndex`, hashed
with the request's adapter, cache salt and images as the engines hash it) wins;
ties, and prompts no replica holds, go to the least-loaded replica, and among equally loaded
ones to the one holding the fewest blocks, so that new prefixes (a new tenant's system
prompt) spread over the replicas instead of piling onto the first. Two guards:

- **Load guard.** A warm replica is not piled on: when the best prefix holder has more than
  ``load_guard`` requests above the least-loaded replica, the least-loaded one takes the
  request (and from then on holds that prefix too).
- **Session affinity.** A request carrying a session id goes to the replica that id hashes
  to on a consistent-hash ring of replica ids (the load guard still applies), so a
  conversation stays on one replica and a replica joining or leaving moves only its own
  share of sessions.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.prefix_index import PrefixIndex
from gateway.routing import Replica, RequestInfo, RoutingPolicy, replica_load, session_id_var
from switchyard.block_hash import block_extra_keys, lora_adapter_key

# Points per replica on the hash ring; more points spread sessions more evenly.
_RING_POINTS = 64


def _ring_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class PrefixAwarePolicy(RoutingPolicy):
    """Longest cached prefix first, under a load guard, with optional session affinity."""

    def __init__(self, index: PrefixIndex, load_guard: int = 4) -> None:
        self._index = index
        self._load_guard = load_guard
        self._ring_ids: tuple[str, ...] = ()
        self._ring: list[tuple[int, str]] = []

    def select(self, replicas: Sequence[Replica], request_info: RequestInfo) -> Replica:
        least = min(
            replicas,
            key=lambda r: (
                replica_load(r),
                self._index.num_blocks(r.replica_id),
                r.kv_usage,
                r.replica_id,
            ),
        )
        extra_keys = block_extra_keys(
            _adapter_key(replicas, request_info.adapter), request_info.cache_salt
        )
        if request_info.session_id:
            chosen = self._session_replica(replicas, request_info.session_id)
        else:
            matched = self._index.matched_blocks(
                [r.replica_id for r in replicas],
                request_info.prompt_token_ids,
                extra_keys,
                request_info.media,
            )
            chosen = max(
                replicas,
                key=lambda r: (
                    matched[r.replica_id],
                    -replica_load(r),
                    -r.kv_usage,
                    r.replica_id == least.replica_id,
                ),
            )
            if matched[chosen.replica_id] == 0:
                chosen = least
        if replica_load(chosen) - replica_load(least) > self._load_guard:
            chosen = least
        self._index.note_routed(
            chosen.replica_id, request_info.prompt_token_ids, extra_keys, request_info.media
        )
        return chosen

    def _session_replica(self, replicas: Sequence[Replica], session_id: str) -> Replica:
        ids = tuple(sorted(r.replica_id for r in replicas))
        if ids != self._ring_ids:
            self._ring_ids = ids
            self._ring = sorted(
                (_ring_hash(f"{replica_id}#{i}"), replica_id)
                for replica_id in ids
                for i in range(_RING_POINTS)
            )
        point = bisect.bisect(self._ring, (_ring_hash(session_id), ""))
        replica_id = self._ring[point % len(self._ring)][1]
        return next(r for r in replicas if r.replica_id == replica_id)


class SessionIdMiddleware:
    """ASGI middleware: exposes the request's ``header`` value as :data:`session_id_var`."""

    def __init__(self, app: ASGIApp, header: str) -> None:
        self.app = app
        self._header = header.lower().encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        value = next((v for k, v in scope["headers"] if k == self._header), b"")
        token = session_id_var.set(value.decode("latin-1"))
        try:
            await self.app(scope, receive, send)
        finally:
            session_id_var.reset(token)


def _adapter_key(replicas: Sequence[Replica], adapter: str) -> str | None:
    """The block-hash key engines use for ``adapter``: its content fingerprint."""
    if not adapter:
        return None
    for replica in replicas:
        for name, fingerprint in replica.lora_fingerprints:
            if name == adapter and fingerprint:
                return lora_adapter_key(fingerprint)
    return adapter  # not reported yet: hashes then match no engine's blocks
