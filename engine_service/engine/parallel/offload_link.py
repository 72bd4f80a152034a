"""Offload on a parallel engine: rank 0's orders to the other ranks of one KV pool.

Rank 0 decides what is offloaded, restored, put and fetched
(:class:`~engine_service.engine.offload.OffloadManager`); each rank moves its own share of
the blocks (:class:`~engine_service.engine.offload_rank.RankOffload`). Two kinds of orders
travel:

- **ops**, the copies between a rank's KV pool and its host buffer, go through the step
  channel (an OFFLOAD message, see :mod:`~engine_service.engine.parallel.channel`), so
  that every rank applies them between the same two forward passes;
- **tasks**, the remote store's puts and fetches, go over an *offload group* of their own
  (gloo: rank 0 and the pool's other ranks), from rank 0's offload worker thread to each
  rank's I/O thread, and their answers come back the same way; neither side's step loop
  waits on them::

    task    int64 [4]        kind, fetch id (FETCH) or ops batch to wait for (PUT), n, 0
    hashes  uint8 [16 n]     the blocks' hashes
    slots   int64 [n]        host slots (PUT only)
    answer  int64 [2]        blocks fetched or stored, 1 if the store answered else 0

A rank answers every task in the order sent, so rank 0 reads the answers in that order. A
STOP task ends a rank's I/O thread. The groups wait without a deadline, like the CPU group:
an idle engine sends no tasks, and a rank that dies closes its sockets.
"""

from __future__ import annotations

import enum
import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from engine_service.engine.offload import RemoteUnavailable
from switchyard.block_hash import BLOCK_HASH_BYTES

if TYPE_CHECKING:
    from engine_service.engine.offload_rank import RankOffload
    from engine_service.engine.parallel.channel import StepChannel

logger = logging.getLogger(__name__)


class TaskKind(enum.IntEnum):
    FETCH = 1
    PUT = 2
    STOP = 3


class OffloadLink:
    """Rank 0's side: ``peers`` (global ranks) hold shares of one KV pool; ``channel`` is
    that pool's step channel, ``group`` its offload group."""

    def __init__(self, channel: StepChannel, group: Any, peers: tuple[int, ...]) -> None:
        self.channel = channel
        self.group = group
        self.peers = peers

    def send_ops(self, seq: int, ops: torch.Tensor) -> None:
        """The ops batch ``seq`` to every peer, before the next step (the engine thread)."""
        self.channel.send_offload(seq, ops)

    def send_fetch(self, fetch_id: int, block_hashes: list[bytes]) -> None:
        """Every peer fetches its share of the chain, kept under ``fetch_id``."""
        self._send_task(TaskKind.FETCH, fetch_id, block_hashes)

    def send_put(self, after_seq: int, blocks: list[tuple[bytes, int]]) -> None:
        """Every peer stores its share of ``(block hash, host slot)`` pairs, once it has
        applied ops batch ``after_seq``."""
        hashes = [block_hash for block_hash, _ in blocks]
        self._send_task(TaskKind.PUT, after_seq, hashes, [slot for _, slot in blocks])

    def _send_task(
        self, kind: TaskKind, ident: int, hashes: list[bytes], slots: list[int] | None = None
    ) -> None:
        """A task to every peer (from rank 0's offload worker thread only)."""
        header = torch.tensor([kind, ident, len(hashes), 0], dtype=torch.int64)
        pieces = [header]
        if hashes:
            pieces.append(torch.frombuffer(bytearray(b"".join(hashes)), dtype=torch.uint8))
        if slots is not None:
            pieces.append(torch.tensor(slots, dtype=torch.int64))
        for peer in self.peers:
            for piece in pieces:
                dist.send(piece, dst=peer, group=self.group)

    def recv_answers(self) -> list[tuple[int, bool]]:
        """Each peer's answer to the oldest unanswered task: (blocks handled, store ok)."""
        answers = []
        for peer in self.peers:
            answer = torch.empty(2, dtype=torch.int64)
            dist.recv(answer, src=peer, group=self.group)
            count, ok = answer.tolist()
            answers.append((count, bool(ok)))
        return answers

    def stop(self) -> None:
        """End the peers' I/O threads (rank 0's offload worker, as it stops)."""
        self._send_task(TaskKind.STOP, 0, [])


def serve_tasks(offload: RankOffload, group: Any, rank: int) -> None:
    """A rank's I/O thread: run rank 0's tasks on this rank's share until STOP. A failed
    call to the store is answered as nothing handled (rank 0 then treats every rank's share
    as a miss); a lost rank 0 ends the thread (the step thread exits the process)."""
    store_down = False
    while True:
        header = torch.empty(4, dtype=torch.int64)
        try:
            dist.recv(header, src=0, group=group)
        except RuntimeError:
            return
        kind, ident, n, _ = header.tolist()
        if kind == TaskKind.STOP:
            return
        raw = torch.empty(n * BLOCK_HASH_BYTES, dtype=torch.uint8)
        dist.recv(raw, src=0, group=group)
        data = raw.numpy().tobytes()
        hashes = [data[i : i + BLOCK_HASH_BYTES] for i in range(0, len(data), BLOCK_HASH_BYTES)]
        slots = None
        if kind == TaskKind.PUT:
            slots = torch.empty(n, dtype=torch.int64)
            dist.recv(slots, src=0, group=group)
        try:
            if slots is None:
                count = offload.fetch(ident, hashes)
            else:
                count = offload.put(list(zip(hashes, slots.tolist())), ident)
            ok = True
            if store_down:
                logger.info("engine rank %d: remote KV store reachable again", rank)
                store_down = False
        except RemoteUnavailable as exc:
            count, ok = 0, False
            if not store_down:
                logger.warning("engine rank %d: remote KV store unavailable (%s)", rank, exc)
                store_down = True
        except Exception:
            # Answered all the same: rank 0 waits for every rank's answer.
            logger.exception("engine rank %d: offload task %s failed", rank, TaskKind(kind).name)
            count, ok = 0, False
        dist.send(torch.tensor([count, int(ok)], dtype=torch.int64), dst=0, group=group)
