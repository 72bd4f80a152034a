"""How rank 0 tells the other ranks what to run: one message per step, broadcast.

Every rank runs the same forward pass on the same flat batch; only rank 0 schedules and
samples. A message is three or four broadcasts from rank 0, in this order::

    header   int64 [HEADER_LEN]  CPU group   kind and sizes (below)
    payload  int64 [n]           CPU group   the step's host arrays, laid end to end
    tokens   int64 [T]           device group the step's token ids (STEP and DRAFT_STEP)
    images   float [I, H]        device group image embeddings (a STEP with I > 0 only)
    hidden   fp32 [T, width]     device group an EAGLE head's hidden inputs (a DRAFT_STEP
                                              whose header gives a width only)

    payload of a STEP:  positions [T] | slots [T] | query_start [B+1] | seq_lens [B]
                        | block_tables [B*W] | logits_indices [L] | block_copies [2C]
                        | lora_slots [T]                           (when a token has an adapter)
                        | mask_offsets [B+1] | custom_mask [M]     (the two when M > 0)
                        | image_rows [I]                          (when I > 0)
                        | rope_positions [R*T]                    (M-RoPE, R = 1 or 3)
    payload of MOVES:   (src, dst) slot pairs [2C]
    payload of LORA:    one flag per adapter piece [P], then       (see lora_manager.SlotWrite)
    weights  dtype [n]           device group  the pieces' pairs, flattened (LORA only)
    payload of OFFLOAD: the ops [4n] of one batch (offload_rank.Op); the header's second
                        field numbers the batch

Images (vision-language models): rank 0 alone holds the vision tower and runs it; the
embeddings of the step's image rows travel with the step, as the query rows they replace
and the rows themselves, and under M-RoPE the step's rotary positions too.

A DRAFT_STEP is a STEP of the proposer's model rather than the target's: the ``mtp``
proposer's runner (the checkpoint's MTP layers, split like the target), a draft model's
(split like the target) or an EAGLE head's (whole on every rank), each run by every rank on
a cache of its own (:mod:`engine_service.engine.spec.ranks`); its layout is a STEP's. The
hidden rows an EAGLE head feeds back travel as fp32, which holds bf16 and fp16 exactly.

Token ids travel on the device group because rank 0 fills a step's pending rows from the
previous step's samples on the device (no host sync); the rest is host data already.

A LORA message repeats one of rank 0's adapter slot writes (or clears) on the other ranks.
Rank 0 writes its own slot when it admits a request, possibly while the step before runs
on the device worker thread; so the write is queued here and goes out just before the next
STEP or MOVES, from the thread that sends those, and every rank applies it in that order.

An OFFLOAD message carries rank 0's copies between a rank's KV pool and its host tier
(:mod:`~engine_service.engine.parallel.offload_link`); rank 0 sends it from the thread
that steps the engine while no step is being sent, right before the step that needs it.

Under data-parallel attention each data-parallel rank runs its own batch: rank 0 sends the
message of each to the ranks of its tensor-parallel group point to point instead (a channel
with ``peers``), and the first rank of that group sends its logits rows back to rank 0 after
the forward pass (``send_logits`` / ``recv_logits``; after an EAGLE head's draft step, its
output rows follow the logits the same way).
The CPU group is gloo, also when the device group is NCCL, and waits without a deadline:
an idle engine sends nothing for as long as it is idle, and a rank that dies closes its
sockets, which fails the other ranks' broadcasts at once.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from engine_service.engine.lora_manager import SlotWrite
from engine_service.engine.model_runner import StepInputs
from engine_service.layers.paged_attention import AttentionMetadata

HEADER_LEN = 16
_HIDDEN_WIDTH = 14  # header field: width of a DRAFT_STEP's hidden rows (0: none)
# The dtypes image embeddings travel in (the header names one by its index).
_EMBED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Kind(enum.IntEnum):
    STEP = 1
    MOVES = 2  # KV slot moves after speculative verification (ModelRunner.move_slots)
    SHUTDOWN = 3
    LORA = 4  # an adapter slot write (lora_manager.SlotWrite)
    DRAFT_STEP = 5  # a step of the proposer's model (MTP layers, draft model, EAGLE head)
    OFFLOAD = 6  # copies between the KV pool and the host tier (offload_rank.Op rows)


@dataclass(slots=True)
class StepMessage:
    """A step as the ranks receive it: the runner's inputs and the block copies first;
    for an EAGLE head's draft step, the hidden rows it feeds in (fp32; ``None``: the
    target's features at the step's slots)."""

    inputs: StepInputs
    block_copies: list[tuple[int, int]]
    hidden: torch.Tensor | None = None


@dataclass(slots=True)
class Message:
    kind: Kind
    step: StepMessage | None = None
    moves: list[tuple[int, int]] | None = None
    slot_write: SlotWrite | None = None
    offload: tuple[int, torch.Tensor] | None = None  # (batch number, ops [n, 4])


def pack_step(
    *,
    kind: Kind = Kind.STEP,
    num_tokens: int,
    num_seqs: int,
    width: int,
    max_query_len: int,
    max_seq_len: int,
    positions: np.ndarray,
    slots: np.ndarray,
    query_start: np.ndarray,
    seq_lens: np.ndarray,
    block_tables: np.ndarray,
    logits_indices: np.ndarray,
    block_copies: list[tuple[int, int]],
    lora_slots: np.ndarray | None,
    custom_mask: torch.Tensor | None,
    custom_mask_offsets: torch.Tensor | None,
    mm_rows: torch.Tensor | None = None,
    mm_embeds: torch.Tensor | None = None,
    rope_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, payload) of a STEP (or DRAFT_STEP) from rank 0's host arrays (copied: the
    runner's buffers are reused by the next step while this one may still be sent)."""
    pieces = [
        positions,
        slots,
        query_start,
        seq_lens,
        block_tables.reshape(-1),
        logits_indices,
        np.asarray(block_copies, dtype=np.int64).reshape(-1),
    ]
    if lora_slots is not None:
        pieces.append(lora_slots)
    mask_len = 0
    if custom_mask is not None:
        assert custom_mask_offsets is not None
        mask_len = int(custom_mask.numel())
        pieces += [custom_mask_offsets.cpu().numpy(), custom_mask.cpu().numpy()]
    num_image_rows = embed_width = embed_dtype = rope_rows = 0
    if mm_rows is not None:
        assert mm_embeds is not None
        num_image_rows, embed_width = mm_embeds.shape
        embed_dtype = _EMBED_DTYPES.index(mm_embeds.dtype)
        pieces.append(mm_rows.numpy())
    if rope_positions is not None:
        rope_rows = 1 if rope_positions.dim() == 1 else rope_positions.shape[0]
        pieces.append(rope_positions.numpy().reshape(-1))
    payload = torch.from_numpy(np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces]))
    header = torch.tensor(
        [
            kind,
            num_tokens,
            num_seqs,
            width,
            len(logits_indices),
            max_query_len,
            max_seq_len,
            len(block_copies),
            len(lora_slots) if lora_slots is not None else 0,
            mask_len,
            num_image_rows,
            embed_width,
            embed_dtype,
            rope_rows,
            0,  # hidden width: set by send_step when hidden rows go along
            payload.numel(),
        ],
        dtype=torch.int64,
    )
    return header, payload


class StepChannel:
    """Both ends of the broadcast: rank 0 calls ``send_*``, the others ``recv``.

    ``peers`` (data-parallel attention): the ranks this channel talks to, point to point
    instead of broadcasting: on rank 0 the ranks of one data-parallel rank's tensor-parallel
    group, whose first rank sends the logits back; on those ranks ``(0,)``. ``step_kind``:
    what the steps prepared for this channel are (a DRAFT_STEP channel serves the proposer's
    runner; :meth:`for_drafts`).
    """

    def __init__(
        self,
        device: torch.device,
        cpu_group: Any,
        device_group: Any = None,
        peers: tuple[int, ...] | None = None,
        step_kind: Kind = Kind.STEP,
    ) -> None:
        self.device = device
        self.cpu_group = cpu_group
        self.device_group = device_group
        self.source = 0  # rank 0 of the default group
        self.peers = peers
        # Rank 0's adapter slot writes not sent yet (appended and taken from two threads).
        self._slot_writes: deque[SlotWrite] = deque()
        self.step_kind = step_kind

    def for_drafts(self) -> StepChannel:
        """The same ranks and groups, for the proposer's steps (DRAFT_STEP)."""
        return StepChannel(
            self.device, self.cpu_group, self.device_group, self.peers, Kind.DRAFT_STEP
        )

    def _broadcast(self, tensor: torch.Tensor, group: Any) -> None:
        if self.peers is None:
            dist.broadcast(tensor, src=self.source, group=group)
        elif dist.get_rank() == self.source:
            for peer in self.peers:
                dist.send(tensor, dst=peer, group=group)
        else:
            dist.recv(tensor, src=self.source, group=group)

    def send_logits(self, logits: torch.Tensor) -> None:
        """A data-parallel rank's logits rows (or an EAGLE head's output rows), fp32, to
        rank 0 (after its forward pass; from the first rank of its tensor-parallel group,
        which gathered them)."""
        dist.send(logits.float().contiguous(), dst=self.source, group=self.device_group)

    def recv_logits(self, rows: int, width: int) -> torch.Tensor:
        """Rank 0: the ``[rows, width]`` fp32 logits (or head outputs) of this channel's
        data-parallel rank."""
        assert self.peers
        logits = torch.empty((rows, width), dtype=torch.float32, device=self.device)
        dist.recv(logits, src=self.peers[0], group=self.device_group)
        return logits

    # -- rank 0 ---------------------------------------------------------------------------

    def queue_slot_write(self, write: SlotWrite) -> None:
        """Send ``write`` to the other ranks before the next step (a LoRA slot listener)."""
        self._slot_writes.append(write)

    def _send_slot_writes(self) -> None:
        while self._slot_writes:
            write = self._slot_writes.popleft()
            header = torch.zeros(HEADER_LEN, dtype=torch.int64)
            header[:4] = torch.tensor([Kind.LORA, write.slot, write.rank, write.weights.numel()])
            header[-1] = len(write.pieces)
            self._broadcast(header, self.cpu_group)
            self._broadcast(torch.tensor(write.pieces, dtype=torch.int64), self.cpu_group)
            if write.weights.numel():
                self._broadcast(write.weights, self.device_group)

    def send_step(
        self,
        header: torch.Tensor,
        payload: torch.Tensor,
        input_ids: torch.Tensor,
        mm_embeds: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
    ) -> None:
        """A step (``header`` and ``payload`` from :func:`pack_step`); ``hidden``: the
        ``[T, width]`` rows an EAGLE head's draft step feeds in."""
        self._send_slot_writes()
        if hidden is not None:
            header = header.clone()
            header[_HIDDEN_WIDTH] = hidden.shape[1]
        self._broadcast(header, self.cpu_group)
        self._broadcast(payload, self.cpu_group)
        self._broadcast(input_ids.contiguous(), self.device_group)
        if mm_embeds is not None:
            self._broadcast(mm_embeds.contiguous(), self.device_group)
        if hidden is not None:
            self._broadcast(hidden.float().contiguous(), self.device_group)

    def send_moves(self, copies: list[tuple[int, int]]) -> None:
        self._send_slot_writes()
        payload = torch.tensor(copies, dtype=torch.int64).reshape(-1)
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[0], header[-1] = Kind.MOVES, payload.numel()
        self._broadcast(header, self.cpu_group)
        self._broadcast(payload, self.cpu_group)

    def send_offload(self, seq: int, ops: torch.Tensor) -> None:
        """Offload ops batch ``seq`` (``[n, 4]`` int64), to be applied before the next step."""
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[0], header[1], header[-1] = Kind.OFFLOAD, seq, ops.numel()
        self._broadcast(header, self.cpu_group)
        self._broadcast(ops.reshape(-1).contiguous(), self.cpu_group)

    def send_shutdown(self) -> None:
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[0] = Kind.SHUTDOWN
        self._broadcast(header, self.cpu_group)

    # -- the other ranks ------------------------------------------------------------------

    def recv(self, lora_dtype: torch.dtype | None = None) -> Message:
        """The next message; ``lora_dtype`` is the dtype of adapter slot weights."""
        header = torch.empty(HEADER_LEN, dtype=torch.int64)
        self._broadcast(header, self.cpu_group)
        kind = Kind(int(header[0]))
        if kind == Kind.SHUTDOWN:
            return Message(kind)
        payload = torch.empty(int(header[-1]), dtype=torch.int64)
        self._broadcast(payload, self.cpu_group)
        if kind == Kind.MOVES:
            pairs = payload.view(-1, 2).tolist()
            return Message(kind, moves=[(int(a), int(b)) for a, b in pairs])
        if kind == Kind.OFFLOAD:
            return Message(kind, offload=(int(header[1]), payload.view(-1, 4)))
        if kind == Kind.LORA:
            if lora_dtype is None:
                raise RuntimeError("an adapter slot write reached a rank without LoRA")
            _, slot, rank, numel = header[:4].tolist()
            weights = torch.empty(numel, dtype=lora_dtype, device=self.device)
            if numel:
                self._broadcast(weights, self.device_group)
            pieces = tuple(bool(flag) for flag in payload.tolist())
            return Message(kind, slot_write=SlotWrite(slot, rank, pieces, weights))
        return Message(kind, step=self._unpack_step(header.tolist(), payload))

    def _unpack_step(self, header: list[int], payload: torch.Tensor) -> StepMessage:
        (
            _,
            num_tokens,
            num_seqs,
            width,
            num_logits,
            max_q,
            max_s,
            num_copies,
            lora_len,
            mask_len,
            num_image_rows,
            embed_width,
            embed_dtype,
            rope_rows,
            hidden_width,
            _,
        ) = header
        sizes = [
            num_tokens,
            num_tokens,
            num_seqs + 1,
            num_seqs,
            num_seqs * width,
            num_logits,
            2 * num_copies,
            lora_len,
        ]
        if mask_len:
            sizes += [num_seqs + 1, mask_len]
        sizes += [num_image_rows, rope_rows * num_tokens]
        parts = list(payload.split(sizes))
        positions, slots, query_start, seq_lens, tables, logits_indices, copies, lora = parts[:8]
        image_rows, rope_positions = parts[-2:]
        input_ids = torch.empty(num_tokens, dtype=torch.int64, device=self.device)
        self._broadcast(input_ids, self.device_group)
        mm_rows = mm_embeds = None
        if num_image_rows:
            mm_embeds = torch.empty(
                (num_image_rows, embed_width),
                dtype=_EMBED_DTYPES[embed_dtype],
                device=self.device,
            )
            self._broadcast(mm_embeds, self.device_group)
            mm_rows = image_rows.to(self.device)

        def to(t: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return t.to(device=self.device, dtype=dtype)

        query_start_host = query_start.to(torch.int32)
        seq_lens_host = seq_lens.to(torch.int32)
        meta = AttentionMetadata(
            num_tokens=num_tokens,
            num_seqs=num_seqs,
            max_query_len=max_q,
            max_seq_len=max_s,
            query_start_loc=to(query_start_host, torch.int32),
            seq_lens=to(seq_lens_host, torch.int32),
            positions=to(positions),
            slot_mapping=to(slots),
            block_tables=to(tables.view(num_seqs, width), torch.int32),
            query_start_loc_host=query_start_host,
            seq_lens_host=seq_lens_host,
        )
        if mask_len:
            meta.custom_mask_offsets = to(parts[8])
            meta.custom_mask = to(parts[9], torch.bool)
        inputs = StepInputs(
            input_ids=input_ids,
            positions=meta.positions,
            meta=meta,
            logits_indices=to(logits_indices),
            pending_rows=None,
            pending_src=None,
            lora_token_slots=to(lora) if lora_len else None,
            mm_rows=mm_rows,
            mm_embeds=mm_embeds,
            rope_positions=(
                rope_positions.view(rope_rows, num_tokens).squeeze(0).to(self.device)
                if rope_rows
                else None
            ),
        )
        hidden = None
        if hidden_width:
            hidden = torch.empty(
                (num_tokens, hidden_width), dtype=torch.float32, device=self.device
            )
            self._broadcast(hidden, self.device_group)
        pairs = copies.view(-1, 2).tolist()
        return StepMessage(inputs, [(int(a), int(b)) for a, b in pairs], hidden)
