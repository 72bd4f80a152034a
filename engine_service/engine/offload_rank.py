"""One rank's side of offload: its host buffer, the copies between that buffer and the rank's
KV pool, and its own calls to the remote store.

Rank 0's :class:`~engine_service.engine.offload.OffloadManager` decides everything (which
block goes to which host slot, what comes back, what is put and fetched); every rank that
holds a share of the pool carries the decisions out on its own share, rank 0 included::

    rank 0: OffloadManager ──ops (apply)──────────────▶ RankOffload of rank 0
                  │ └─ops: the step channel (OFFLOAD)──▶ RankOffload of rank r (step thread)
                  └──tasks: the offload group──────────▶ RankOffload of rank r (its I/O thread)
                     ◀──── (blocks fetched or put, ok) ─┘

- **Ops** are rows of four int64 (:class:`Op`, three arguments), applied in order by the
  rank's step thread between two forward passes: a block saved to a host slot, a block
  restored from a host slot or from a finished fetch, a finished fetch dropped. Every rank
  gets the same rows; the slots and block ids are the same on every rank, only the bytes
  (each rank's heads) differ.
- **Tasks** run on the rank's I/O thread: a *put* reads host slots and stores them under this
  rank's fingerprint, once the ops that filled those slots have been applied here (their
  sequence number says which); a *fetch* looks up and reads a chain of blocks and keeps them
  by fetch id until an op loads or drops them. Each returns how many blocks it handled, and
  rank 0 takes the smallest count over the ranks, so a block is restored only when every
  rank has its share.

The fingerprint names this rank's slice of the heads (``switchyard.fingerprint``): ranks
that hold the same slice (a replicated key/value head, or the whole latent of multi-head
latent attention on every rank) read the same blocks, and only the first of them stores.
"""

from __future__ import annotations

import enum
import threading
from typing import TYPE_CHECKING

import torch

from engine_service.layers.parallel import TensorParallel, kv_shard
from engine_service.models.config import ModelConfig
from switchyard.fingerprint import checkpoint_id, kv_fingerprint

if TYPE_CHECKING:
    from engine_service.engine.offload import RemoteKVStore

OP_WIDTH = 4


class Op(enum.IntEnum):
    SAVE = 1  # (block id, host slot): device block -> host slot
    LOAD_HOST = 2  # (host slot, block id): host slot -> device block
    LOAD_FETCHED = 3  # (fetch id, index in the fetch, block id): fetched block -> device
    DROP = 4  # (fetch id): forget a fetch's blocks


def rank_kv_fingerprint(
    model_dir: str,
    model_config: ModelConfig,
    block_size: int,
    kv_cache: torch.Tensor,
    tp: TensorParallel,
) -> tuple[bytes, bool]:
    """This rank's fingerprint for ``kv_cache``'s blocks, and whether it is the first rank
    holding its slice of the heads (the one that stores it)."""
    heads = model_config.kv_block_shape(block_size)[3]
    shard, first = kv_shard(heads, tp.rank, tp.size)
    fingerprint = kv_fingerprint(
        checkpoint_id(model_dir), kv_cache.dtype, tuple(kv_cache.shape[1:]), tp.size, shard
    )
    return fingerprint, first


class RankOffload:
    """A rank's host buffer of ``num_slots`` blocks shaped like ``kv_cache``'s, and its link
    to the ``remote`` store under ``fingerprint``; ``stores_blocks``: this rank puts its
    slice (False on all but the first rank of a replicated slice).

    :meth:`apply` runs on the rank's step thread; :meth:`put` and :meth:`fetch` on its I/O
    thread, and raise :class:`~engine_service.engine.offload.RemoteUnavailable` as the
    store does.
    """

    def __init__(
        self,
        kv_cache: torch.Tensor,
        num_slots: int,
        fingerprint: bytes,
        remote: RemoteKVStore | None,
        stores_blocks: bool = True,
    ) -> None:
        self.kv_cache = kv_cache
        self.block_shape = tuple(kv_cache.shape[1:])
        self.block_bytes = kv_cache[0].numel() * kv_cache.element_size()
        self.host = torch.empty(
            (num_slots, *self.block_shape),
            dtype=kv_cache.dtype,
            pin_memory=kv_cache.device.type == "cuda",
        )
        self.fingerprint = fingerprint
        self.remote = remote
        self.stores_blocks = stores_blocks
        # Fetched blocks by fetch id: written by the I/O thread before it reports the fetch,
        # read and dropped by ops that rank 0 sends only after that report.
        self._fetched: dict[int, list[torch.Tensor]] = {}
        self._applied = threading.Condition()
        self._applied_seq = 0
        self._copies_done: torch.cuda.Event | None = None

    @property
    def num_fetches_held(self) -> int:
        return len(self._fetched)

    # -- the step thread ------------------------------------------------------------------

    def apply(self, seq: int, ops: torch.Tensor) -> None:
        """Run the ``[n, 4]`` ops in order (copies are asynchronous on CUDA); ``seq``
        numbers the batch, which puts wait for."""
        kv_cache, host = self.kv_cache, self.host
        for op, a, b, c in ops.tolist():
            if op == Op.SAVE:
                host[b].copy_(kv_cache[a], non_blocking=True)
            elif op == Op.LOAD_HOST:
                kv_cache[b].copy_(host[a], non_blocking=True)
            elif op == Op.LOAD_FETCHED:
                kv_cache[c].copy_(self._fetched[a][b], non_blocking=True)
            elif op == Op.DROP:
                self._fetched.pop(a, None)
            else:
                raise ValueError(f"unknown offload op {op}")
        event = None
        if kv_cache.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        with self._applied:
            self._applied_seq = seq
            self._copies_done = event
            self._applied.notify_all()

    # -- the I/O thread -------------------------------------------------------------------

    def put(self, blocks: list[tuple[bytes, int]], after_seq: int) -> int:
        """Store the host slots of ``blocks`` (``(block hash, slot)``) once the ops of batch
        ``after_seq`` (which filled them) are applied and their copies done; how many the
        store took. The slots stay untouched meanwhile: rank 0 holds them until every rank
        has answered."""
        if not self.stores_blocks:
            return len(blocks)  # the first rank of this slice stores it
        assert self.remote is not None
        with self._applied:
            # Bounded: rank 0 sent that batch before it handed out the put, and this rank's
            # step thread applies batches as they arrive.
            self._applied.wait_for(lambda: self._applied_seq >= after_seq)
            copies_done = self._copies_done
        if copies_done is not None:
            copies_done.synchronize()
        payloads = [
            (block_hash, self.host[slot].reshape(-1).view(torch.uint8).numpy().tobytes())
            for block_hash, slot in blocks
        ]
        return self.remote.put(self.fingerprint, payloads)

    def fetch(self, fetch_id: int, block_hashes: list[bytes]) -> int:
        """Look up and read the longest stored prefix of ``block_hashes``, keeping the
        blocks under ``fetch_id``; how many leading blocks arrived whole."""
        assert self.remote is not None
        num_present = self.remote.lookup(self.fingerprint, block_hashes)
        wanted = block_hashes[:num_present]
        payloads = self.remote.get(self.fingerprint, wanted) if wanted else []
        blocks: list[torch.Tensor] = []
        for payload in payloads:
            if payload is None or len(payload) != self.block_bytes:
                break
            block = torch.frombuffer(bytearray(payload), dtype=self.kv_cache.dtype)
            blocks.append(block.view(self.block_shape))
        if blocks:
            self._fetched[fetch_id] = blocks
        return len(blocks)
