"""Fan-out of the replica's KV events to ``WatchKVEvents`` streams.

Gateways watch each replica directly rather than reading events off heartbeats: events
change every step, only gateways need them, and a stream gives them within a step instead of
a heartbeat interval later, without the controller relaying them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from engine_service.engine.kv_events import KVEvent, KVTier
from switchyard.v1 import engine_pb2

# Event batches a KV-event watcher may fall behind by before it is cut off.
KV_EVENT_QUEUE_BATCHES = 1024


class KVEventHub:
    """What the replica holds, per tier, and the ``WatchKVEvents`` streams to tell.

    It mirrors the engine's block set from its events (the engine thread cannot be asked),
    so a new watcher starts from a snapshot of the mirror and then gets every later batch.
    Runs on the event loop only.
    """

    def __init__(self, replica_id: str, block_size: int) -> None:
        self.replica_id = replica_id
        self.block_size = block_size
        self._held: dict[KVTier, set[bytes]] = {tier: set() for tier in KVTier}
        self._watchers: set[asyncio.Queue[engine_pb2.KVEventBatch | None]] = set()

    def publish(self, events: list[KVEvent]) -> None:
        for event in events:
            held = self._held[event.tier]
            if event.stored:
                held.update(event.block_hashes)
            else:
                held.difference_update(event.block_hashes)
        batch = self._batch(events, snapshot=False)
        for queue in list(self._watchers):
            try:
                queue.put_nowait(batch)
            except asyncio.QueueFull:
                # Too far behind to catch up by events: end its stream; it resubscribes.
                self._watchers.discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)

    async def watch(self) -> AsyncIterator[engine_pb2.KVEventBatch]:
        """The snapshot, then every batch; ends with ``OverflowError`` when cut off."""
        queue: asyncio.Queue[engine_pb2.KVEventBatch | None] = asyncio.Queue(KV_EVENT_QUEUE_BATCHES)
        self._watchers.add(queue)
        try:
            snapshot = [KVEvent(True, tier, list(hashes)) for tier, hashes in self._held.items()]
            yield self._batch(snapshot, snapshot=True)
            while (batch := await queue.get()) is not None:
                yield batch
            raise OverflowError("fell too far behind the replica's KV events; watch again")
        finally:
            self._watchers.discard(queue)

    def _batch(self, events: list[KVEvent], *, snapshot: bool) -> engine_pb2.KVEventBatch:
        return engine_pb2.KVEventBatch(
            snapshot=snapshot,
            replica_id=self.replica_id,
            block_size=self.block_size,
            events=[
                engine_pb2.KVEvent(
                    stored=event.stored, tier=int(event.tier), block_hashes=event.block_hashes
                )
                for event in events
            ],
        )
