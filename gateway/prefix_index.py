"""Which replica holds which prompt prefix: an index fed by the engines' KV events.

Every engine streams the blocks it stores and drops (``WatchKVEvents``: a snapshot, then
batches). :class:`KVEventFollower` keeps one such stream per READY replica and applies it to
a :class:`PrefixIndex`, which answers "how many leading blocks of this prompt does replica R
hold?" by hashing the prompt the way the engines do (:mod:`switchyard.block_hash`, with the
block size each replica announced, and the request's
:func:`~switchyard.block_hash.block_extra_keys`: its adapter and cache salt; and its
images, in the blocks their placeholders cover)::

    prompt      [ block 0 | block 1 | block 2 | block 3 | tail ]
    replica a     held      held      held      -              -> 3 blocks
    replica b     held      -         held      ...            -> 1 block (a prefix stops at a gap)

A routing decision is also noted as *pending* for a few seconds, so that a burst of requests
sharing a prefix follows the first one before the replica's events confirm it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import grpc

from gateway.routing import Replica
from switchyard.block_hash import MediaSpan, chained_block_hashes
from switchyard.grpc_utils import insecure_channel
from switchyard.v1 import engine_pb2, engine_pb2_grpc

logger = logging.getLogger(__name__)

PENDING_TTL_S = 10.0


@dataclass(slots=True)
class _ReplicaBlocks:
    block_size: int
    # block hash -> bit mask of the tiers (KVTier values) holding it
    held: dict[bytes, int] = field(default_factory=dict)
    # block hash -> when a routing decision's optimistic entry expires
    pending: dict[bytes, float] = field(default_factory=dict)

    def has(self, block_hash: bytes, now: float) -> bool:
        if block_hash in self.held:
            return True
        expiry = self.pending.get(block_hash)
        return expiry is not None and expiry > now


class PrefixIndex:
    """Per replica, the block hashes it holds (any tier) and recent routing guesses."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._replicas: dict[str, _ReplicaBlocks] = {}
        self._clock = clock

    def replica_ids(self) -> list[str]:
        return list(self._replicas)

    def reset(self, replica_id: str, block_size: int) -> None:
        """Forget what the replica held (a new snapshot follows)."""
        self._replicas[replica_id] = _ReplicaBlocks(block_size)

    def drop(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    def apply(
        self, replica_id: str, stored: bool, tier: int, block_hashes: Iterable[bytes]
    ) -> None:
        blocks = self._replicas.get(replica_id)
        if blocks is None:
            return
        bit = 1 << tier
        held = blocks.held
        if stored:
            for block_hash in block_hashes:
                held[block_hash] = held.get(block_hash, 0) | bit
                blocks.pending.pop(block_hash, None)
        else:
            for block_hash in block_hashes:
                mask = held.get(block_hash, 0) & ~bit
                if mask:
                    held[block_hash] = mask
                else:
                    held.pop(block_hash, None)

    def num_blocks(self, replica_id: str) -> int:
        """How many blocks the replica holds (any tier); 0 for one the index does not know."""
        blocks = self._replicas.get(replica_id)
        return 0 if blocks is None else len(blocks.held)

    def note_routed(
        self,
        replica_id: str,
        token_ids: Sequence[int],
        extra_keys: tuple[str, ...] = (),
        media: Sequence[MediaSpan] = (),
    ) -> None:
        """The prompt is about to be computed on the replica: count its blocks as held there
        for a while. ``extra_keys`` and ``media`` as for :meth:`matched_blocks`."""
        blocks = self._replicas.get(replica_id)
        if blocks is None:
            return
        now = self._clock()
        expiry = now + PENDING_TTL_S
        pending = blocks.pending
        for block_hash in chained_block_hashes(token_ids, blocks.block_size, extra_keys, media):
            if block_hash not in blocks.held:
                pending[block_hash] = expiry
        if len(pending) > 4 * len(blocks.held) + 1024:
            blocks.pending = {h: t for h, t in pending.items() if t > now}

    def matched_blocks(
        self,
        replica_ids: Sequence[str],
        token_ids: Sequence[int],
        extra_keys: tuple[str, ...] = (),
        media: Sequence[MediaSpan] = (),
    ) -> dict[str, int]:
        """For each replica, how many leading full blocks of ``token_ids`` it holds, the
        blocks hashed with ``extra_keys`` (:func:`~switchyard.block_hash.block_extra_keys` of
        the request's adapter and cache salt) and the images ``media`` in the blocks they
        cover, as the engine hashes them."""
        now = self._clock()
        hashes_by_size: dict[int, list[bytes]] = {}
        matched: dict[str, int] = {}
        for replica_id in replica_ids:
            blocks = self._replicas.get(replica_id)
            if blocks is None:
                matched[replica_id] = 0
                continue
            hashes = hashes_by_size.get(blocks.block_size)
            if hashes is None:
                hashes = chained_block_hashes(token_ids, blocks.block_size, extra_keys, media)
                hashes_by_size[blocks.block_size] = hashes
            count = 0
            for block_hash in hashes:
                if not blocks.has(block_hash, now):
                    break
                count += 1
            matched[replica_id] = count
        return matched


class KVEventFollower:
    """Follows ``WatchKVEvents`` of every READY replica of ``replicas()`` into ``index``.

    The set of replicas is re-read every ``sync_interval_s``; a stream that fails is retried
    with backoff (its replica keeps its last known blocks meanwhile; a replica that leaves
    the table is forgotten).
    """

    def __init__(
        self,
        index: PrefixIndex,
        replicas: Callable[[], Sequence[Replica]],
        *,
        sync_interval_s: float = 1.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self._index = index
        self._replicas = replicas
        self._sync_interval_s = sync_interval_s
        self._max_backoff_s = max_backoff_s
        self._followers: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._task: asyncio.Task[None] | None = None

    def channel_addresses(self) -> set[str]:
        """The replica addresses this follower holds an open channel to."""
        return set(self._channels)

    async def start(self) -> None:
        await self.sync()
        self._task = asyncio.create_task(self._sync_forever(), name="kv-events-sync")

    async def close(self) -> None:
        tasks = [task for _, task in self._followers.values()]
        if self._task is not None:
            tasks.append(self._task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._followers.clear()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def sync(self) -> None:
        """Start following new READY replicas and stop following those that left (closing
        the channels no follower uses any more)."""
        ready = {r.replica_id: r.address for r in self._replicas() if r.ready}
        stopped: list[asyncio.Task[None]] = []
        for replica_id, (address, task) in list(self._followers.items()):
            if ready.get(replica_id) != address:
                task.cancel()
                stopped.append(task)
                del self._followers[replica_id]
                self._index.drop(replica_id)
        for replica_id, address in ready.items():
            if replica_id not in self._followers:
                channel = self._channels.get(address)
                if channel is None:
                    channel = self._channels[address] = insecure_channel(address)
                task = asyncio.create_task(
                    self._follow(replica_id, channel), name=f"kv-events-{replica_id}"
                )
                self._followers[replica_id] = (address, task)
        for task in stopped:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        in_use = {address for address, _ in self._followers.values()}
        for address in [address for address in self._channels if address not in in_use]:
            await self._channels.pop(address).close()

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sync_interval_s)
            await self.sync()

    async def _follow(self, replica_id: str, channel: grpc.aio.Channel) -> None:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        backoff = 0.2
        while True:
            try:
                async for batch in stub.WatchKVEvents(engine_pb2.WatchKVEventsRequest()):
                    if batch.snapshot:
                        self._index.reset(replica_id, batch.block_size)
                        backoff = 0.2
                    for event in batch.events:
                        self._index.apply(replica_id, event.stored, event.tier, event.block_hashes)
            except grpc.aio.AioRpcError as exc:
                logger.info(
                    "KV event stream ended; retrying",
                    extra={"replica": replica_id, "code": exc.code().name},
                )
            except Exception:
                # Not an RPC failure (a bug, a malformed batch): keep following, loudly.
                logger.exception(
                    "KV event follower failed; retrying", extra={"replica": replica_id}
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff_s)
