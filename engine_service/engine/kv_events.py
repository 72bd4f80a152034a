"""KV events: which blocks this engine started or stopped holding, per tier, for routers.

A gateway that knows which replica holds which prefix can send a request where its prompt is
already cached. The engine records an event whenever a block enters or leaves the device
prefix cache or the host tier; the service drains the log after every step and streams it
to gateways. Runs of events of one kind and tier are merged, so a prefill of many blocks is
one event.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class KVTier(enum.IntEnum):
    """Where an engine holds a block; the values are those of the wire enum ``KVTier``."""

    DEVICE = 1
    HOST = 2


@dataclass(slots=True)
class KVEvent:
    """``block_hashes`` were stored in (or, ``stored=False``, removed from) ``tier``."""

    stored: bool
    tier: KVTier
    block_hashes: list[bytes] = field(default_factory=list)


class KVEventLog:
    """Events since the last :meth:`drain`, in order; a listener of the device prefix cache.

    Not thread-safe: the engine thread records and drains.
    """

    def __init__(self) -> None:
        self._events: list[KVEvent] = []

    def record(self, stored: bool, tier: KVTier, block_hash: bytes) -> None:
        last = self._events[-1] if self._events else None
        if last is not None and last.stored == stored and last.tier == tier:
            last.block_hashes.append(block_hash)
        else:
            self._events.append(KVEvent(stored, tier, [block_hash]))

    def drain(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    # PrefixCacheListener, for the device tier.

    def block_cached(self, block_hash: bytes, block_id: int) -> None:
        self.record(True, KVTier.DEVICE, block_hash)

    def block_evicted(self, block_hash: bytes, block_id: int) -> None:
        self.record(False, KVTier.DEVICE, block_hash)


class SharedKVEvents:
    """The event log of several KV pools that one engine reports as one (the pools of its
    data-parallel ranks, and their host tiers): per tier, a block hash is stored when the
    first pool holds it and removed when the last one lets it go, so routers see the union.
    A listener of each pool's device prefix cache, and the event log of each pool's
    offload manager."""

    def __init__(self, log: KVEventLog) -> None:
        self.log = log
        self._holders: dict[tuple[KVTier, bytes], int] = {}

    def record(self, stored: bool, tier: KVTier, block_hash: bytes) -> None:
        key = (tier, block_hash)
        count = self._holders.get(key, 0)
        if stored:
            self._holders[key] = count + 1
            if count == 0:
                self.log.record(True, tier, block_hash)
        elif count <= 1:
            self._holders.pop(key, None)
            self.log.record(False, tier, block_hash)
        else:
            self._holders[key] = count - 1

    def block_cached(self, block_hash: bytes, block_id: int) -> None:
        self.record(True, KVTier.DEVICE, block_hash)

    def block_evicted(self, block_hash: bytes, block_id: int) -> None:
        self.record(False, KVTier.DEVICE, block_hash)
