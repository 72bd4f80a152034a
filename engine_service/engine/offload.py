"""Offload tiers: where KV blocks go when they leave the device pool, and how they come back.

::

    device pool ──evicted (and, write-through, on commit)──▶ host tier ──put (worker)──▶ remote store
        ▲                                                     │                             │
        ├──── restore: a copy in the step, before the forward ┘                             │
        └──── restore: a copy in the step, from a finished fetch ◀── fetch (worker) ◀───────┘

- The **host tier** is a bounded LRU of whole blocks (:class:`HostTier` keeps the slots; the
  bytes live in a host buffer, pinned when the pool is on CUDA). A cached block evicted from
  the device pool is copied there before its memory is reused. A block moves as one
  contiguous run (all layers together), which the layout
  ``kv_cache[num_blocks, *model_config.kv_block_shape(block_size)]`` makes possible (keys and
  values per head, or one latent per token for DeepSeek's MLA: sizes follow the model).
- The **remote store** (the KV service, plugged in by the engine service behind
  :class:`RemoteKVStore`) receives every block that enters the host tier, asynchronously and
  in batches. With write-through, blocks enter the host tier when they are committed to the
  prefix cache, not only when evicted, so another replica sees a prefix as soon as it is
  computed.
- A new request whose prefix continues past the device cache is matched against the lower
  tiers before its prefill is scheduled. Host-tier blocks are copied into freshly allocated
  device blocks in the same step (a memory copy; asynchronous on CUDA). For blocks past the
  host tier, a worker thread asks the remote store for the longest stored prefix and fetches
  it, while the request waits aside; the step loop only polls, it never waits on I/O.

Decisions and bytes are apart, so that one manager serves a pool split over ranks. The
:class:`OffloadManager` (on the engine thread of rank 0) decides which block goes to which
host slot, what is restored, put and fetched; a
:class:`~engine_service.engine.offload_rank.RankOffload` per rank holding a share of the pool
(its key/value heads under tensor parallelism) carries the decisions out on that share: the
copies as ops applied in order between two forward passes, the puts and fetches under the
rank's own fingerprint. Rank 0's share is ``local``; the other ranks' get the same ops and
tasks through an :class:`~engine_service.engine.parallel.offload_link.OffloadLink`. A fetch
counts only the blocks that every rank got; a rank that cannot reach the store turns the
whole fetch into a miss.

Ops are queued as decided and applied by :meth:`OffloadManager.apply_transfers` once the
scheduler is done, always before the next forward pass writes into a block. Everything but
the worker runs on the engine thread.
"""

from __future__ import annotations

import abc
import importlib
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from engine_service.engine.kv_events import KVTier
from engine_service.engine.offload_rank import Op
from engine_service.engine.request import Request

if TYPE_CHECKING:
    from engine_service.engine.kv_events import KVEventLog, SharedKVEvents
    from engine_service.engine.offload_rank import RankOffload
    from engine_service.engine.parallel.offload_link import OffloadLink

logger = logging.getLogger(__name__)

# Blocks per remote Put; larger batches amortize the round trip.
_PUT_BATCH_BLOCKS = 64
# Hashes remembered as present in the remote store, so that a block is not put twice.
_REMOTE_KNOWN_LIMIT = 1 << 16


class RemoteUnavailable(Exception):
    """The remote store could not be reached or failed; the caller treats it as a miss."""


class RemoteKVStore(abc.ABC):
    """A store of KV blocks shared by replicas, addressed by (fingerprint, block hash).

    Contract: every method blocks and is called only from an offload worker thread; a
    failure raises :class:`RemoteUnavailable`. Payloads are the raw bytes of one block.
    """

    @abc.abstractmethod
    def lookup(self, fingerprint: bytes, block_hashes: list[bytes]) -> int:
        """How many leading hashes of the chain the store holds."""

    @abc.abstractmethod
    def get(self, fingerprint: bytes, block_hashes: list[bytes]) -> list[bytes | None]:
        """The payloads, in order; None for a block the store no longer has or found corrupt."""

    @abc.abstractmethod
    def put(self, fingerprint: bytes, blocks: list[tuple[bytes, bytes]]) -> int:
        """Store ``(block_hash, payload)`` pairs; return how many the store accepted."""

    def reopen_spec(self) -> tuple[str, dict[str, Any]] | None:
        """How another process (a rank of a parallel engine) opens the same store: a
        ``module:callable`` and its keyword arguments (JSON values), for
        :func:`open_remote_store`; None when the store exists in this process only."""
        return None


def open_remote_store(spec: tuple[str, dict[str, Any]]) -> RemoteKVStore:
    """The store a :meth:`RemoteKVStore.reopen_spec` names (imported here, so that the engine
    core itself imports no client library)."""
    factory_path, kwargs = spec
    module_name, _, name = factory_path.partition(":")
    factory = getattr(importlib.import_module(module_name), name)
    store = factory(**kwargs)
    if not isinstance(store, RemoteKVStore):
        raise TypeError(f"{factory_path} did not make a RemoteKVStore")
    return store


class HostTier:
    """The slots of a bounded LRU of whole blocks (``buffer[slot]`` per block, on each rank).

    A slot can be *held* (a remote put reading it, a restore scheduled from it); held slots
    are never evicted or reused until released.
    """

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._slots: OrderedDict[bytes, int] = OrderedDict()  # least recently used first
        self._free = list(range(num_slots))
        self._holds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._slots

    def hashes(self) -> list[bytes]:
        return list(self._slots)

    def lookup(self, block_hash: bytes) -> int | None:
        """The block's slot (now most recently used), or None."""
        slot = self._slots.get(block_hash)
        if slot is not None:
            self._slots.move_to_end(block_hash)
        return slot

    def reserve(self, block_hash: bytes) -> tuple[int | None, bytes | None]:
        """A slot for a new block, and the hash evicted to make room (if any).

        The slot is None when every slot is held.
        """
        if self._free:
            slot = self._free.pop()
            self._slots[block_hash] = slot
            return slot, None
        victim = next((h for h, s in self._slots.items() if s not in self._holds), None)
        if victim is None:
            return None, None
        slot = self._slots.pop(victim)
        self._slots[block_hash] = slot
        return slot, victim

    def hold(self, slot: int) -> None:
        self._holds[slot] = self._holds.get(slot, 0) + 1

    def release(self, slot: int) -> None:
        remaining = self._holds[slot] - 1
        if remaining:
            self._holds[slot] = remaining
        else:
            del self._holds[slot]


@dataclass(slots=True, eq=False)
class Prefetch:
    """A request's lower-tier lookup, kept on ``Request.kv_transfer``.

    ``fetched`` maps the hashes of the blocks that every rank fetched to their index in
    fetch ``fetch_id``; the ranks keep those blocks until a restore or :meth:`forget
    <OffloadManager.forget>` drops them (``fetch_id`` -1: nothing held). ``abandoned``: the
    request went away while its fetch ran.
    """

    done: bool = True
    fetch_id: int = -1
    fetched: dict[bytes, int] = field(default_factory=dict)
    abandoned: bool = False


@dataclass(slots=True)
class Restore:
    """A block to bring back into the device pool: from host slot ``ref`` (``tier`` HOST),
    or from block ``ref`` of the request's fetch (``tier`` None: the remote store)."""

    block_hash: bytes
    tier: KVTier | None
    ref: int


@dataclass(slots=True)
class _Fetch:
    request: Request
    block_hashes: list[bytes]
    fetch_id: int


@dataclass(slots=True)
class _Put:
    blocks: list[tuple[bytes, int]]  # (hash, host slot)
    after_seq: int  # the ops batch that filled the slots


@dataclass(slots=True)
class OffloadStats:
    offloaded_blocks: int = 0  # device -> host copies
    restored_blocks_host: int = 0
    restored_blocks_remote: int = 0
    dropped_blocks: int = 0  # no host slot free (all held)
    remote_put_blocks: int = 0  # accepted by the remote store (on every rank)
    remote_errors: int = 0


class OffloadManager:
    """The host tier, the remote store and the worker between them, for one KV pool.

    It listens to the device prefix cache (saving blocks on eviction, and on commit with
    write-through), answers the scheduler's lower-tier lookups, and queues the copies.
    ``num_slots`` host slots on every rank of the pool; ``local``: rank 0's share (None
    when the pool is another data-parallel rank's); ``peers``: the pool's other ranks;
    ``remote``: every rank of the pool has a remote store.
    """

    def __init__(
        self,
        num_slots: int,
        local: RankOffload | None,
        peers: OffloadLink | None = None,
        *,
        remote: bool,
        write_through: bool,
        events: KVEventLog | SharedKVEvents | None,
        remote_retry_s: float = 2.0,
    ) -> None:
        self._host = HostTier(num_slots) if num_slots else None
        self.local = local
        self._peers = peers
        self._remote = remote
        self._write_through = write_through and remote
        self._events = events
        self.stats = OffloadStats()

        self._ops: list[tuple[int, int, int, int]] = []
        self._seq = 0  # ops batches applied
        self._step_holds: list[int] = []
        self._pending_puts: list[tuple[bytes, int]] = []
        self._remote_known: OrderedDict[bytes, None] = OrderedDict()
        self._next_fetch_id = 0

        # Worker state. The worker posts finished work to _done; the engine thread polls it.
        self._cond = threading.Condition()
        self._fetches: deque[_Fetch] = deque()
        self._puts: deque[_Put] = deque()
        self._done: queue.SimpleQueue[_Fetch | _Put] = queue.SimpleQueue()
        self._in_flight_fetches = 0
        self._stopping = False
        self._remote_retry_s = remote_retry_s
        self._remote_down_until = 0.0  # written by the worker, read by the engine thread
        self._worker: threading.Thread | None = None
        if remote:
            self._worker = threading.Thread(target=self._work, name="kv-offload", daemon=True)
            self._worker.start()

    @property
    def host_capacity_blocks(self) -> int:
        return 0 if self._host is None else self._host.num_slots

    @property
    def num_host_blocks(self) -> int:
        return 0 if self._host is None else len(self._host)

    def host_block_hashes(self) -> list[bytes]:
        return [] if self._host is None else self._host.hashes()

    @property
    def remote_available(self) -> bool:
        return self._remote and time.monotonic() >= self._remote_down_until

    def close(self) -> None:
        """Stop the worker (and, on a parallel engine, the other ranks' I/O threads)."""
        if self._worker is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify()
            self._worker.join()

    # -- listening to the device prefix cache --------------------------------------------

    def block_cached(self, block_hash: bytes, block_id: int) -> None:
        if self._write_through:
            self._save(block_hash, block_id)

    def block_evicted(self, block_hash: bytes, block_id: int) -> None:
        self._save(block_hash, block_id)

    def _save(self, block_hash: bytes, block_id: int) -> None:
        host = self._host
        if host is None or host.lookup(block_hash) is not None:
            return
        slot, evicted = host.reserve(block_hash)
        if slot is None:
            self.stats.dropped_blocks += 1
            return
        if self._events is not None:
            if evicted is not None:
                self._events.record(False, KVTier.HOST, evicted)
            self._events.record(True, KVTier.HOST, block_hash)
        self._ops.append((Op.SAVE, block_id, slot, 0))
        self.stats.offloaded_blocks += 1
        if self._remote and block_hash not in self._remote_known:
            host.hold(slot)
            self._pending_puts.append((block_hash, slot))

    # -- the scheduler's side -------------------------------------------------------------

    def lower_tier_hits(self, request: Request, block_hashes: list[bytes]) -> list[Restore] | None:
        """The blocks of ``block_hashes`` (the chain right after the device-cache hit) that
        lower tiers can restore, as a leading run; None when the request must wait for a
        remote fetch that this call started.

        The first time a request is looked at, a remote fetch starts for whatever the host
        tier does not hold; once it is done, host and fetched blocks are matched together.
        """
        prefetch = request.kv_transfer
        if prefetch is None:
            restores = self._match(None, block_hashes)
            rest = block_hashes[len(restores) :]
            if rest and self.remote_available:
                fetch_id = self._next_fetch_id
                self._next_fetch_id += 1
                request.kv_transfer = Prefetch(done=False, fetch_id=fetch_id)
                with self._cond:
                    self._fetches.append(_Fetch(request, rest, fetch_id))
                    self._in_flight_fetches += 1
                    self._cond.notify()
                return None
            request.kv_transfer = Prefetch()
            return restores
        assert isinstance(prefetch, Prefetch) and prefetch.done
        return self._match(prefetch, block_hashes)

    def _match(self, prefetch: Prefetch | None, block_hashes: list[bytes]) -> list[Restore]:
        restores: list[Restore] = []
        for block_hash in block_hashes:
            slot = self._host.lookup(block_hash) if self._host is not None else None
            if slot is not None:
                assert self._host is not None
                # Held until the copy is queued, so that a save in this step cannot reuse it.
                self._host.hold(slot)
                self._step_holds.append(slot)
                restores.append(Restore(block_hash, KVTier.HOST, slot))
                continue
            index = prefetch.fetched.get(block_hash) if prefetch is not None else None
            if index is None:
                break
            restores.append(Restore(block_hash, None, index))
        return restores

    def restore(self, request: Request, restores: list[Restore], block_ids: list[int]) -> None:
        """Queue the copies of ``restores`` into the freshly allocated ``block_ids``."""
        prefetch = request.kv_transfer
        for item, block_id in zip(restores, block_ids, strict=True):
            if item.tier is KVTier.HOST:
                self._ops.append((Op.LOAD_HOST, item.ref, block_id, 0))
                self.stats.restored_blocks_host += 1
            else:
                assert isinstance(prefetch, Prefetch)
                self._ops.append((Op.LOAD_FETCHED, prefetch.fetch_id, item.ref, block_id))
                self.stats.restored_blocks_remote += 1
        if isinstance(prefetch, Prefetch):
            self._drop_fetch(prefetch)

    def forget(self, request: Request) -> None:
        """The request is gone (finished or aborted): the ranks drop what it fetched, now
        or, if its fetch still runs, when it ends."""
        prefetch = request.kv_transfer
        if not isinstance(prefetch, Prefetch):
            return
        if prefetch.done:
            self._drop_fetch(prefetch)
        else:
            prefetch.abandoned = True

    def _drop_fetch(self, prefetch: Prefetch) -> None:
        if prefetch.fetch_id >= 0:
            self._ops.append((Op.DROP, prefetch.fetch_id, 0, 0))
            prefetch.fetch_id = -1
        prefetch.fetched.clear()

    def poll(self) -> list[Request]:
        """Requests whose remote fetch finished since the last poll; releases the host
        slots of finished puts."""
        ready: list[Request] = []
        while True:
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                return ready
            if isinstance(item, _Fetch):
                self._in_flight_fetches -= 1
                prefetch = item.request.kv_transfer
                assert isinstance(prefetch, Prefetch)
                if prefetch.abandoned:
                    self._drop_fetch(prefetch)
                else:
                    ready.append(item.request)
            else:
                assert self._host is not None
                for _, slot in item.blocks:
                    self._host.release(slot)

    @property
    def fetches_in_flight(self) -> int:
        return self._in_flight_fetches

    def wait(self, timeout_s: float) -> None:
        """Sleep until the worker finishes something or ``timeout_s`` passes; for an engine
        that has nothing to run but requests waiting on fetches."""
        try:
            item = self._done.get(timeout=timeout_s)
        except queue.Empty:
            return
        self._done.put(item)

    # -- the copies -----------------------------------------------------------------------

    def apply_transfers(self) -> None:
        """Apply the queued ops on every rank of the pool (rank 0's now, the others' before
        their next step), then hand new host blocks to the remote store."""
        if self._ops:
            self._seq += 1
            ops = torch.tensor(self._ops, dtype=torch.int64)
            self._ops = []
            if self._peers is not None:
                self._peers.send_ops(self._seq, ops)
            if self.local is not None:
                self.local.apply(self._seq, ops)
        if self._step_holds:
            assert self._host is not None
            for slot in self._step_holds:
                self._host.release(slot)
            self._step_holds = []
        if self._pending_puts:
            with self._cond:
                self._puts.append(_Put(self._pending_puts, self._seq))
                self._cond.notify()
            self._pending_puts = []

    # -- the worker -----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not (self._fetches or self._puts or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    break
                if self._fetches:
                    task: _Fetch | _Put = self._fetches.popleft()
                else:
                    task = self._puts.popleft()
                    while self._puts and len(task.blocks) < _PUT_BATCH_BLOCKS:
                        more = self._puts.popleft()
                        task = _Put(task.blocks + more.blocks, more.after_seq)
            if isinstance(task, _Fetch):
                self._fetch(task)
            else:
                self._put(task)
            self._done.put(task)
        if self._peers is not None:
            self._peers.stop()

    def _on_ranks(self, send_to_peers: Callable[[OffloadLink], None], run_local) -> int:
        """Run one task on every rank of the pool (the other ranks get it first, so that
        they work while rank 0 does); the smallest count any rank handled, or -1 when a
        rank's store failed (logged, and backed off here)."""
        if self._peers is not None:
            send_to_peers(self._peers)
        counts: list[int] = []
        failure: str | None = None
        if self.local is not None:
            try:
                counts.append(run_local())
            except RemoteUnavailable as exc:
                failure = str(exc)
            except Exception as exc:  # still read the peers' answers, and never stall
                logger.exception("offload task failed on engine rank 0")
                failure = repr(exc)
        if self._peers is not None:
            for peer, (count, ok) in zip(self._peers.peers, self._peers.recv_answers()):
                counts.append(count)
                if not ok and failure is None:
                    failure = f"engine rank {peer} could not reach it"
        if failure is not None:
            self._remote_failed(failure)
            return -1
        self._remote_ok()
        return min(counts)

    def _fetch(self, task: _Fetch) -> None:
        prefetch = task.request.kv_transfer
        assert isinstance(prefetch, Prefetch)
        if self.remote_available:
            fetch_id, hashes, local = task.fetch_id, task.block_hashes, self.local
            count = self._on_ranks(
                lambda peers: peers.send_fetch(fetch_id, hashes),
                lambda: local.fetch(fetch_id, hashes),
            )
            # A rank may hold more blocks than every rank has: the drop clears them.
            wanted = hashes[: max(count, 0)]
            prefetch.fetched = {block_hash: i for i, block_hash in enumerate(wanted)}
            for block_hash in wanted:
                self._remember_remote(block_hash)
        else:
            prefetch.fetch_id = -1  # no rank was asked
        prefetch.done = True

    def _put(self, task: _Put) -> None:
        if not self.remote_available:
            return
        blocks, after_seq, local = task.blocks, task.after_seq, self.local
        accepted = self._on_ranks(
            lambda peers: peers.send_put(after_seq, blocks),
            lambda: local.put(blocks, after_seq),
        )
        if accepted < 0:
            return
        self.stats.remote_put_blocks += accepted
        for block_hash, _ in blocks:
            self._remember_remote(block_hash)

    def _remember_remote(self, block_hash: bytes) -> None:
        known = self._remote_known
        known[block_hash] = None
        known.move_to_end(block_hash)
        if len(known) > _REMOTE_KNOWN_LIMIT:
            known.popitem(last=False)

    def _remote_ok(self) -> None:
        if self._remote_down_until:
            logger.info("remote KV store reachable again; offloading and fetching resume")
            self._remote_down_until = 0.0

    def _remote_failed(self, reason: str) -> None:
        self.stats.remote_errors += 1
        if not self._remote_down_until:
            logger.warning(
                "remote KV store unavailable (%s); serving from local tiers and recomputing "
                "misses, retrying every %.1fs",
                reason,
                self._remote_retry_s,
            )
            # The store may come back empty: forget what it held.
            self._remote_known.clear()
        self._remote_down_until = time.monotonic() + self._remote_retry_s
