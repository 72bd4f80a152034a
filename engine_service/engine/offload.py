"""Offload tiers: where KV blocks go when they leave the device pool, and how they come back.

::

    device pool ──evicted (and, write-through, on commit)──▶ host tier ──put (worker)──▶ remote store
        ▲                                                     │   ▲                         │
        └──── restore: a copy in the step, before the forward ┘   └── fetch (worker) ◀──────┘

- The **host tier** is a bounded LRU of whole blocks in one host tensor (pinned when the pool
  is on CUDA). A cached block evicted from the device pool is copied there before its memory
  is reused. A block moves as one contiguous run (all layers together), which the layout
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

Copies are queued as ordered transfers and applied by :meth:`OffloadManager.apply_transfers`
once the scheduler is done and again after the step's commits, always before the next
forward pass writes into a block. Everything but the worker runs on the engine thread.
"""

from __future__ import annotations

import abc
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from engine_service.engine.kv_events import KVEventLog, KVTier
from engine_service.engine.request import Request

logger = logging.getLogger(__name__)

# Blocks per remote Put; larger batches amortize the round trip.
_PUT_BATCH_BLOCKS = 64
# Hashes remembered as present in the remote store, so that a block is not put twice.
_REMOTE_KNOWN_LIMIT = 1 << 16


class RemoteUnavailable(Exception):
    """The remote store could not be reached or failed; the caller treats it as a miss."""


class RemoteKVStore(abc.ABC):
    """A store of KV blocks shared by replicas, addressed by (fingerprint, block hash).

    Contract: every method blocks and is called only from the offload worker thread; a
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


class HostTier:
    """A bounded LRU of whole blocks in one host tensor, ``buffer[slot]`` per block.

    A slot can be *held* (a remote put reading it, a restore scheduled from it); held slots
    are never evicted or reused until released.
    """

    def __init__(self, num_slots: int, block_shape: tuple[int, ...], dtype: torch.dtype, pin: bool):
        self.buffer = torch.empty((num_slots, *block_shape), dtype=dtype, pin_memory=pin)
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

    ``blocks`` are what the remote store returned, by hash, until the request is admitted.
    """

    done: bool = True
    blocks: dict[bytes, torch.Tensor] = field(default_factory=dict)


@dataclass(slots=True)
class Restore:
    """A block to bring back into the device pool, from ``tier``."""

    block_hash: bytes
    source: torch.Tensor
    tier: KVTier | None  # None: the remote store


@dataclass(slots=True)
class _Save:
    block_id: int
    slot: int


@dataclass(slots=True)
class _Load:
    source: torch.Tensor
    block_id: int


@dataclass(slots=True)
class _Fetch:
    request: Request
    block_hashes: list[bytes]


@dataclass(slots=True)
class _Put:
    blocks: list[tuple[bytes, int]]  # (hash, host slot)
    ready: torch.cuda.Event | None  # the device-to-host copies are done when it fires


@dataclass(slots=True)
class OffloadStats:
    offloaded_blocks: int = 0  # device -> host copies
    restored_blocks_host: int = 0
    restored_blocks_remote: int = 0
    dropped_blocks: int = 0  # no host slot free (all held)
    remote_put_blocks: int = 0  # accepted by the remote store
    remote_errors: int = 0


class OffloadManager:
    """The host tier, the remote store and the worker between them, for one engine.

    It listens to the device prefix cache (saving blocks on eviction, and on commit with
    write-through), answers the scheduler's lower-tier lookups, and queues the copies.
    """

    def __init__(
        self,
        kv_cache: torch.Tensor,
        host_bytes: int,
        remote: RemoteKVStore | None,
        fingerprint: bytes,
        *,
        write_through: bool,
        events: KVEventLog | None,
        remote_retry_s: float = 2.0,
    ) -> None:
        self._kv_cache = kv_cache
        block_shape = tuple(kv_cache.shape[1:])
        block_bytes = kv_cache[0].numel() * kv_cache.element_size()
        num_slots = host_bytes // block_bytes
        pin = kv_cache.device.type == "cuda"
        self._host = HostTier(num_slots, block_shape, kv_cache.dtype, pin) if num_slots else None
        self._block_shape = block_shape
        self._block_bytes = block_bytes
        self._remote = remote
        self._fingerprint = fingerprint
        self._write_through = write_through and remote is not None
        self._events = events
        self.stats = OffloadStats()

        self._transfers: list[_Save | _Load] = []
        self._step_holds: list[int] = []
        self._pending_puts: list[tuple[bytes, int]] = []
        self._remote_known: OrderedDict[bytes, None] = OrderedDict()

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
        if remote is not None:
            self._worker = threading.Thread(target=self._work, name="kv-offload", daemon=True)
            self._worker.start()

    @property
    def host_capacity_blocks(self) -> int:
        return 0 if self._host is None else self._host.buffer.shape[0]

    @property
    def num_host_blocks(self) -> int:
        return 0 if self._host is None else len(self._host)

    def host_block_hashes(self) -> list[bytes]:
        return [] if self._host is None else self._host.hashes()

    @property
    def remote_available(self) -> bool:
        return self._remote is not None and time.monotonic() >= self._remote_down_until

    def close(self) -> None:
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
        self._transfers.append(_Save(block_id, slot))
        self.stats.offloaded_blocks += 1
        if self._remote is not None and block_hash not in self._remote_known:
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
                request.kv_transfer = Prefetch(done=False)
                with self._cond:
                    self._fetches.append(_Fetch(request, rest))
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
                restores.append(Restore(block_hash, self._host.buffer[slot], KVTier.HOST))
                continue
            fetched = prefetch.blocks.get(block_hash) if prefetch is not None else None
            if fetched is None:
                break
            restores.append(Restore(block_hash, fetched, None))
        return restores

    def restore(self, request: Request, restores: list[Restore], block_ids: list[int]) -> None:
        """Queue the copies of ``restores`` into the freshly allocated ``block_ids``."""
        for item, block_id in zip(restores, block_ids, strict=True):
            self._transfers.append(_Load(item.source, block_id))
            if item.tier is KVTier.HOST:
                self.stats.restored_blocks_host += 1
            else:
                self.stats.restored_blocks_remote += 1
        if isinstance(request.kv_transfer, Prefetch):
            request.kv_transfer.blocks.clear()

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
        """Run the queued copies in order, then hand new host blocks to the remote store."""
        transfers, self._transfers = self._transfers, []
        kv_cache = self._kv_cache
        for transfer in transfers:
            if isinstance(transfer, _Save):
                assert self._host is not None
                self._host.buffer[transfer.slot].copy_(
                    kv_cache[transfer.block_id], non_blocking=True
                )
            else:
                kv_cache[transfer.block_id].copy_(transfer.source, non_blocking=True)
        if self._step_holds:
            assert self._host is not None
            for slot in self._step_holds:
                self._host.release(slot)
            self._step_holds = []
        if self._pending_puts:
            ready = None
            if kv_cache.device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record()
            with self._cond:
                self._puts.append(_Put(self._pending_puts, ready))
                self._cond.notify()
            self._pending_puts = []

    # -- the worker -----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not (self._fetches or self._puts or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    return
                if self._fetches:
                    task: _Fetch | _Put = self._fetches.popleft()
                else:
                    task = self._puts.popleft()
                    while self._puts and len(task.blocks) < _PUT_BATCH_BLOCKS:
                        more = self._puts.popleft()
                        task = _Put(task.blocks + more.blocks, more.ready or task.ready)
            if isinstance(task, _Fetch):
                self._fetch(task)
            else:
                self._put(task)
            self._done.put(task)

    def _fetch(self, task: _Fetch) -> None:
        prefetch = task.request.kv_transfer
        assert isinstance(prefetch, Prefetch) and self._remote is not None
        try:
            if self.remote_available:
                num_present = self._remote.lookup(self._fingerprint, task.block_hashes)
                wanted = task.block_hashes[:num_present]
                payloads = self._remote.get(self._fingerprint, wanted) if wanted else []
                for block_hash, payload in zip(wanted, payloads):
                    if payload is None or len(payload) != self._block_bytes:
                        break
                    block = torch.frombuffer(bytearray(payload), dtype=self._kv_cache.dtype)
                    prefetch.blocks[block_hash] = block.view(self._block_shape)
                    self._remember_remote(block_hash)
                self._remote_ok()
        except RemoteUnavailable as exc:
            self._remote_failed(exc)
        prefetch.done = True

    def _put(self, task: _Put) -> None:
        assert self._remote is not None and self._host is not None
        if not self.remote_available:
            return
        if task.ready is not None:
            task.ready.synchronize()
        buffer = self._host.buffer
        blocks = [
            (block_hash, buffer[slot].reshape(-1).view(torch.uint8).numpy().tobytes())
            for block_hash, slot in task.blocks
        ]
        try:
            self.stats.remote_put_blocks += self._remote.put(self._fingerprint, blocks)
        except RemoteUnavailable as exc:
            self._remote_failed(exc)
            return
        self._remote_ok()
        for block_hash, _ in task.blocks:
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

    def _remote_failed(self, exc: RemoteUnavailable) -> None:
        self.stats.remote_errors += 1
        if not self._remote_down_until:
            logger.warning(
                "remote KV store unavailable (%s); serving from local tiers and recomputing "
                "misses, retrying every %.1fs",
                exc,
                self._remote_retry_s,
            )
            # The store may come back empty: forget what it held.
            self._remote_known.clear()
        self._remote_down_until = time.monotonic() + self._remote_retry_s
