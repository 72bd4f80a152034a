"""The model runner: turns a :class:`ScheduledBatch` into one ragged batch and runs the model.

Inputs are built from numpy arrays in persistent buffers, with no Python loop over tokens:
per sequence only its block table and its slice of token ids are copied. Two buffer sets
alternate, so the inputs of step N+1 are written while step N (overlapped) still reads its
own. On CUDA the host arrays go through pinned memory in one asynchronous copy each; steps
whose shape fits a captured CUDA graph replay it (:mod:`engine_service.engine.cuda_graphs`).

With LoRA, the step's per-token adapter slots (``ScheduledSequence.adapter_slot - 1``, ``-1``
for the base model) go into the model's :class:`LoRASlots` right before its forward pass;
a step without adapters sets ``None`` and the deltas do nothing. Steps with adapters replay
CUDA graphs when every delta runs without host syncs (the graphs read the slots from a
static buffer), else they run eagerly. Under tensor parallelism the slots travel in the
step's broadcast, so every rank's deltas read the same ones.

With images, the step's :class:`~engine_service.engine.multimodal.MMSpan` rows of encoder
output (computed by the engine before ``prepare``) replace the placeholder tokens'
embeddings; under M-RoPE the rotary positions of sequences with images differ from their
cache indices. Such steps run eagerly too.

Under tensor parallelism this runner, on rank 0, also broadcasts each step through its
``channel`` (:mod:`engine_service.engine.parallel.channel`) right before running it; the
other ranks' runners get the same inputs and call :meth:`ModelRunner.run_step`. Only rank 0
gets logits. A draft model's runner does the same with a channel of draft steps. Under
data-parallel attention rank 0 keeps a *remote* runner per other rank
(:meth:`ModelRunner.for_peer`): it prepares that rank's steps and sends them; executing one
(a draft model's steps) waits for the rank's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine_service.engine.batch import DeviceDrafts, ScheduledBatch
from engine_service.engine.sampler import _pinned_to
from engine_service.layers.lora import LoRASlots
from engine_service.layers.paged_attention import AttentionBackend, AttentionMetadata
from engine_service.models.hidden_states import HiddenStateStore

if TYPE_CHECKING:
    from engine_service.engine.parallel.channel import StepChannel
    from engine_service.engine.spec.verify import Verification


@dataclass(slots=True)
class StepInputs:
    """A step's device inputs. ``pending_rows`` are query rows whose token id comes from
    the previous step's sampled tokens (``pending_src`` indexes them)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor
    pending_rows: torch.Tensor | None
    pending_src: torch.Tensor | None
    lora_token_slots: torch.Tensor | None = None
    # Images: query rows that take encoder outputs, and those rows' embeddings; under
    # M-RoPE, the rotary positions ([3, T] with image tokens in the step, else [T]) when
    # they differ from the cache indices.
    mm_rows: torch.Tensor | None = None
    mm_embeds: torch.Tensor | None = None
    rope_positions: torch.Tensor | None = None
    broadcast: tuple[torch.Tensor, torch.Tensor] | None = None  # (header, payload), rank 0
    # Drafts still on the device (speculative decoding): query rows ``draft_rows`` take
    # ``draft_tokens.view(-1)[draft_src]``; without rows, every sequence's step is its
    # newest token then row ``i`` of ``draft_tokens``.
    draft_rows: torch.Tensor | None = None
    draft_src: torch.Tensor | None = None
    draft_tokens: torch.Tensor | None = None


class _HostBuffers:
    """One set of host arrays sized for the largest step (numpy views of torch tensors,
    pinned on CUDA so that copies from them are asynchronous)."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, pin: bool) -> None:
        def buffer(*shape: int, dtype=torch.int64) -> tuple[torch.Tensor, np.ndarray]:
            t = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            return t, t.numpy()

        self.token_ids_t, self.token_ids = buffer(max_tokens)
        self.positions_t, self.positions = buffer(max_tokens)
        self.slots_t, self.slots = buffer(max_tokens)
        self.logits_t, self.logits = buffer(max_tokens)
        self.query_start_t, self.query_start = buffer(max_seqs + 1, dtype=torch.int32)
        self.seq_lens_t, self.seq_lens = buffer(max_seqs, dtype=torch.int32)
        # Tables are built full width, then packed to the step's width in one contiguous run
        # (a strided slice would be staged through pageable memory, which syncs the stream).
        self.tables = np.zeros((max_seqs, max_blocks), dtype=np.int32)
        self.packed_tables_t, self.packed_tables = buffer(max_seqs * max_blocks, dtype=torch.int32)
        self.pending_rows_t, self.pending_rows = buffer(max_seqs)
        self.pending_src_t, self.pending_src = buffer(max_seqs)
        self.lora_slots_t, self.lora_slots = buffer(max_tokens)


class ModelRunner:
    """Owns the model, the KV cache tensor and the step inputs; one ``execute`` per step."""

    def __init__(
        self,
        model: torch.nn.Module,
        backend: AttentionBackend,
        kv_cache: torch.Tensor,
        block_size: int,
        max_num_tokens: int,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        scratch_block: int,
        graphs_max_tokens: int = 0,
        lora_slots: LoRASlots | None = None,
        channel: StepChannel | None = None,
        tp_size: int = 1,
        hidden_store: HiddenStateStore | None = None,
        custom_masks: bool = False,
    ) -> None:
        self._init_inputs(
            model,
            kv_cache.device,
            block_size,
            max_num_tokens,
            max_num_seqs,
            max_blocks_per_seq,
            scratch_block,
            channel,
        )
        self.lora_slots = lora_slots
        # The target's kept hidden states (EAGLE) live per slot like the KV cache, so block
        # copies and slot moves apply to them too.
        self.hidden_store = hidden_store
        self.backend = backend
        self.kv_cache = kv_cache
        config = getattr(model, "config", None)
        if config is not None and not getattr(model, "computes_own_attention", False):
            backend.warm_up(
                kv_cache,
                config.num_heads // tp_size,
                set(config.sliding_windows or [None]),
                max_num_tokens,
                sinks=getattr(model, "attention_sinks", False),
                custom_masks=custom_masks,
            )
        self.last_hidden: torch.Tensor | None = None
        # Pinned staging of move_slots' indices (CUDA), grown on demand.
        self._moves_host: torch.Tensor | None = None
        self._moves_copied: torch.cuda.Event | None = None
        self.graphs = None
        if graphs_max_tokens > 0:
            from engine_service.engine.cuda_graphs import StepGraphs

            self.graphs = StepGraphs(self, graphs_max_tokens, max_num_seqs, trees=custom_masks)

    def _init_inputs(
        self,
        model: torch.nn.Module,
        device: torch.device,
        block_size: int,
        max_num_tokens: int,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        scratch_block: int,
        channel: StepChannel | None,
    ) -> None:
        """What :meth:`prepare` needs: the buffers, the sizes, the channel."""
        self.model = model
        self.channel = channel
        self.remote = False  # the model runs in the channel's peer (see for_peer)
        self.lora_slots = None
        self.block_size = block_size
        self.device = device
        self.scratch_block = scratch_block
        self.max_blocks_per_seq = max_blocks_per_seq
        self.max_num_tokens, self.max_num_seqs = max_num_tokens, max_num_seqs
        pin = device.type == "cuda"
        self._buffers = [
            _HostBuffers(max_num_tokens, max_num_seqs, max_blocks_per_seq, pin) for _ in range(2)
        ]
        self._turn = 0

    @classmethod
    def for_peer(
        cls,
        model: torch.nn.Module,
        device: torch.device,
        block_size: int,
        max_num_tokens: int,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        scratch_block: int,
        channel: StepChannel,
        lora_slots: LoRASlots | None = None,
    ) -> ModelRunner:
        """Rank 0's runner for another data-parallel rank's batches: it prepares their
        steps (:meth:`prepare`, whose message ``channel`` sends to that rank); ``model`` is
        rank 0's copy, read for its config only, and ``lora_slots`` (set when the engine
        serves adapters) only says that steps carry adapter slots. :meth:`execute` sends the
        step and waits for that rank's logits; :meth:`move_slots` only sends the moves."""
        runner = cls.__new__(cls)
        runner._init_inputs(
            model,
            device,
            block_size,
            max_num_tokens,
            max_num_seqs,
            max_blocks_per_seq,
            scratch_block,
            channel,
        )
        runner.lora_slots = lora_slots
        runner.remote = True
        return runner

    def remote_twin(self, channel: StepChannel) -> ModelRunner:
        """A remote runner (:meth:`for_peer`) of this one's model and sizes, for the rank at
        the other end of ``channel``, which holds its own copy of the model."""
        return ModelRunner.for_peer(
            self.model,
            self.device,
            self.block_size,
            self.max_num_tokens,
            self.max_num_seqs,
            self.max_blocks_per_seq,
            self.scratch_block,
            channel,
        )

    # -- inputs ---------------------------------------------------------------------------

    def prepare(
        self, batch: ScheduledBatch, encoder_outputs: dict[str, torch.Tensor] | None = None
    ) -> StepInputs:
        """Build the step's device inputs from the batch (host work, no device sync);
        ``encoder_outputs`` holds the embeddings, by image hash, of every image the batch's
        ``mm_spans`` name."""
        buf = self._buffers[self._turn]
        self._turn ^= 1
        seqs = batch.sequences
        num_seqs, num_tokens, size = len(seqs), batch.num_tokens, self.block_size

        q_lens = np.fromiter((s.num_tokens for s in seqs), np.int64, num_seqs)
        starts = np.fromiter((s.start for s in seqs), np.int64, num_seqs)
        query_start = buf.query_start[: num_seqs + 1]
        query_start[0] = 0
        np.cumsum(q_lens, out=query_start[1:])
        seq_lens = starts + q_lens
        buf.seq_lens[:num_seqs] = seq_lens

        # Token ids: each sequence's slice of known tokens, then its drafts; a token still
        # being sampled by the step in flight is a placeholder filled on the device.
        pieces = []
        num_pending = 0
        for i, s in enumerate(seqs):
            known = s.request.all_token_ids[s.start : s.start + s.num_known_tokens]
            pieces.append(known)
            if s.pending_row >= 0:
                pieces.append((0,))
                buf.pending_rows[num_pending] = int(query_start[i]) + s.num_known_tokens - 1
                buf.pending_src[num_pending] = s.pending_row
                num_pending += 1
            if s.draft_token_ids:
                pieces.append(s.draft_token_ids)
        token_ids = buf.token_ids[:num_tokens]
        token_ids[:] = np.fromiter(chain.from_iterable(pieces), np.int64, num_tokens)

        # Positions: each token's cache index (plus tree offsets); slots through the tables.
        seq_of_token = np.repeat(np.arange(num_seqs), q_lens)
        positions = buf.positions[:num_tokens]
        np.add(np.arange(num_tokens), np.repeat(starts - query_start[:-1], q_lens), out=positions)
        width = int(-(-seq_lens.max() // size))
        tables = buf.tables
        for i, s in enumerate(seqs):
            table = s.request.block_table[:width]
            tables[i, : len(table)] = table
        blocks = tables[seq_of_token, positions // size]
        np.add(blocks * size, positions % size, out=buf.slots[:num_tokens])
        for i, s in enumerate(seqs):
            if s.position_offsets is not None:
                q0 = int(query_start[i])
                positions[q0 : q0 + s.num_tokens] += np.asarray(s.position_offsets)

        num_logits = np.fromiter((s.num_logits for s in seqs), np.int64, num_seqs)
        total_logits = int(num_logits.sum())
        firsts = np.repeat(query_start[1:] - num_logits, num_logits)
        within = np.arange(total_logits) - np.repeat(np.cumsum(num_logits) - num_logits, num_logits)
        np.add(firsts, within, out=buf.logits[:total_logits])

        custom_mask = offsets = None
        if any(s.custom_mask is not None or s.device_tree for s in seqs):
            custom_mask, offsets = self._custom_masks(batch)

        lora_token_slots = lora_host = None
        if self.lora_slots is not None:
            adapter_slots = np.fromiter((s.adapter_slot for s in seqs), np.int64, num_seqs)
            if adapter_slots.any():
                lora_host = buf.lora_slots[:num_tokens]
                np.subtract(np.repeat(adapter_slots, q_lens), 1, out=lora_host)
                lora_token_slots = self._to_device(buf.lora_slots_t[:num_tokens])

        mm_rows = mm_embeds = None  # on the host until the step's message is packed
        if encoder_outputs:
            mm_rows, mm_embeds = self._mm_rows(batch, query_start, encoder_outputs)
        rope_positions = None
        if getattr(self.model.config, "mrope_section", None) and any(
            s.request.mrope_positions is not None for s in seqs
        ):
            rope_positions = self._mrope_positions(
                batch, query_start, positions, bool(encoder_outputs)
            )

        draft_rows = draft_src = None
        if batch.device_drafts is not None:
            draft_rows, draft_src = self._device_draft_rows(batch, query_start)
        device_trees = batch.device_drafts if any(s.device_tree for s in seqs) else None
        # A tree's shape is on this device only: ranks that get the step's host arrays
        # could not build its mask and positions.
        assert device_trees is None or self.channel is None, "device trees on one rank only"

        packed = buf.packed_tables[: num_seqs * width].reshape(num_seqs, width)
        packed[:] = tables[:num_seqs, :width]
        broadcast = None
        if self.channel is not None:
            from engine_service.engine.parallel.channel import pack_step

            broadcast = pack_step(
                kind=self.channel.step_kind,
                num_tokens=num_tokens,
                num_seqs=num_seqs,
                width=width,
                max_query_len=int(q_lens.max()),
                max_seq_len=int(seq_lens.max()),
                positions=positions,
                slots=buf.slots[:num_tokens],
                query_start=query_start,
                seq_lens=buf.seq_lens[:num_seqs],
                block_tables=packed,
                logits_indices=buf.logits[:total_logits],
                block_copies=batch.block_copies,
                lora_slots=lora_host,
                custom_mask=custom_mask,
                custom_mask_offsets=offsets,
                mm_rows=mm_rows,
                mm_embeds=mm_embeds,
                rope_positions=rope_positions,
            )
        to = self._to_device
        meta = AttentionMetadata(
            num_tokens=num_tokens,
            num_seqs=num_seqs,
            max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_lens.max()),
            query_start_loc=to(buf.query_start_t[: num_seqs + 1]),
            seq_lens=to(buf.seq_lens_t[:num_seqs]),
            positions=to(buf.positions_t[:num_tokens]),
            slot_mapping=to(buf.slots_t[:num_tokens]),
            block_tables=to(buf.packed_tables_t[: num_seqs * width].view(num_seqs, width)),
            query_start_loc_host=buf.query_start_t[: num_seqs + 1],
            seq_lens_host=buf.seq_lens_t[:num_seqs],
            custom_mask=custom_mask,
            custom_mask_offsets=offsets,
        )
        rope = to(rope_positions) if rope_positions is not None else None
        if device_trees is not None:
            _add_tree_positions(device_trees, draft_rows, draft_src, meta.positions, rope)
        return StepInputs(
            input_ids=to(buf.token_ids_t[:num_tokens]),
            positions=meta.positions,
            meta=meta,
            logits_indices=to(buf.logits_t[:total_logits]),
            pending_rows=to(buf.pending_rows_t[:num_pending]) if num_pending else None,
            pending_src=to(buf.pending_src_t[:num_pending]) if num_pending else None,
            lora_token_slots=lora_token_slots,
            mm_rows=to(mm_rows) if mm_rows is not None else None,
            mm_embeds=mm_embeds,
            rope_positions=rope,
            broadcast=broadcast,
            draft_rows=draft_rows,
            draft_src=draft_src,
            draft_tokens=batch.device_drafts.tokens if batch.device_drafts is not None else None,
        )

    def _device_draft_rows(
        self, batch: ScheduledBatch, query_start: np.ndarray
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The query rows of drafts still on the device, and where each one's token sits
        in the flattened draft tensor (one copy to the device for both); None for both when
        the step is every sequence's newest token then all its drafts."""
        drafts = batch.device_drafts
        seqs = batch.sequences
        num, width = drafts.tokens.shape
        if (
            num == len(seqs)
            and all(n == width for n in drafts.lengths)
            and all(s.num_tokens == width + 1 for s in seqs)
        ):
            # Every sequence verifies its newest token and all its drafts: the step's
            # input ids are [num, 1 + width], the drafts its last columns (no index).
            return None, None
        lengths = np.asarray(drafts.lengths, dtype=np.int64)
        firsts = np.fromiter(
            (int(query_start[i]) + seqs[i].num_known_tokens for i in drafts.seqs),
            np.int64,
            len(drafts.seqs),
        )
        within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        rows = np.repeat(firsts, lengths) + within
        src = np.repeat(np.arange(len(lengths)) * drafts.tokens.shape[1], lengths) + within
        both = torch.from_numpy(np.stack((rows, src)))
        both = self._to_device(both.pin_memory() if self.device.type == "cuda" else both)
        return both[0], both[1]

    def _mm_rows(
        self,
        batch: ScheduledBatch,
        query_start: np.ndarray,
        encoder_outputs: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The query rows that take image embeddings (on the host), and the embeddings, in
        row order."""
        rows, pieces = [], []
        for i, s in enumerate(batch.sequences):
            for span in s.mm_spans:
                first = int(query_start[i]) + span.image.offset + span.lo - s.start
                rows.append(np.arange(first, first + span.hi - span.lo))
                pieces.append(encoder_outputs[span.image.mm_hash][span.lo : span.hi])
        return torch.from_numpy(np.concatenate(rows)), torch.cat(pieces)

    def _mrope_positions(
        self,
        batch: ScheduledBatch,
        query_start: np.ndarray,
        positions: np.ndarray,
        with_images: bool,
    ) -> torch.Tensor:
        """Rotary positions under M-RoPE: a prompt token of a request with images takes its
        precomputed ``[3]`` position, any later token its cache index plus the request's
        delta. ``[T]`` when no image token is in the step (all three coordinates equal)."""
        rope = np.array(positions, dtype=np.int64)
        rope3 = np.broadcast_to(rope, (3, rope.shape[0])).copy() if with_images else None
        for i, s in enumerate(batch.sequences):
            request = s.request
            if request.mrope_positions is None:
                continue
            q0 = int(query_start[i])
            rows = slice(q0, q0 + s.num_tokens)
            rope[rows] += request.mrope_delta
            if rope3 is not None:
                rope3[:, rows] += request.mrope_delta
                # The prompt part of the chunk: its own 3-D positions.
                prompt_end = min(s.start + s.num_tokens, request.num_prompt_tokens)
                if s.start < prompt_end:
                    n = prompt_end - s.start
                    rope3[:, q0 : q0 + n] = request.mrope_positions[:, s.start : prompt_end]
            else:
                prompt_end = min(s.start + s.num_tokens, request.num_prompt_tokens)
                if s.start < prompt_end:
                    n = prompt_end - s.start
                    # Prompt text with no image in this step: all three coordinates agree.
                    rope[q0 : q0 + n] = request.mrope_positions[0, s.start : prompt_end]
        return torch.from_numpy(rope3 if rope3 is not None else rope)

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return host
        return host.to(self.device, non_blocking=True)

    def _custom_masks(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The contract's flat tree masks: each sequence's own, or its causal triangle; the
        trees whose shape is on the device (:class:`DeviceDrafts`) written there."""
        drafts = batch.device_drafts
        if all(s.device_tree for s in batch.sequences):
            # Every sequence a device tree of one size: the masks are the trees' own.
            blocks = drafts.tree_masks()
            num, area = blocks.shape[0], blocks[0].numel()
            offsets = torch.arange(num + 1, dtype=torch.int64, device=self.device) * area
            return blocks.reshape(-1), offsets
        flat, offsets, offset = [], [], 0
        tree_offsets: dict[int, int] = {}
        for i, s in enumerate(batch.sequences):
            n = s.num_tokens
            mask = s.custom_mask
            if s.device_tree:
                tree_offsets[i] = offset
                mask = torch.zeros(n, n, dtype=torch.bool)  # filled on the device below
            elif mask is None:
                mask = torch.ones(n, n, dtype=torch.bool).tril()
            flat.append(mask.reshape(-1).cpu())
            offsets.append(offset)
            offset += n * n
        offsets.append(offset)
        # From pinned memory: a copy from pageable memory waits for the stream (here, for
        # the proposer's drafting still running on it).
        masks = _pinned_to(torch.cat(flat), self.device)
        if tree_offsets:
            blocks = drafts.tree_masks()  # [R, W + 1, W + 1], in the order of drafts.seqs
            area = blocks[0].numel()
            starts = [tree_offsets[i] for i in drafts.seqs]
            starts = _pinned_to(torch.tensor(starts, dtype=torch.int64), self.device)
            index = starts[:, None] + torch.arange(area, device=self.device)
            masks[index.reshape(-1)] = blocks.reshape(-1)
        return masks, _pinned_to(torch.tensor(offsets, dtype=torch.int64), self.device)

    # -- execution ------------------------------------------------------------------------

    @torch.inference_mode()
    def move_slots(self, copies: list[tuple[int, int]]) -> None:
        """Copy every layer's K/V from slot to slot. All at once: no move reads a slot that
        another writes (an accepted tree path packs towards the front: path position ``j``
        moves from node ``m - 1 >= j``, and later positions read from beyond ``j``). Queued
        on the device now, before anything can reuse a freed source block."""
        if self.channel is not None:
            self.channel.send_moves(copies)
        if self.remote or not copies:
            return
        # Blocks and offsets on the host, one copy to the device: [4, moves] (source and
        # destination blocks, then their offsets).
        slots = np.asarray(copies, dtype=np.int64).T  # [2, moves]: sources, destinations
        count = slots.shape[1]
        if self.device.type == "cuda":
            if self._moves_host is None or self._moves_host.numel() < 4 * count:
                self._moves_host = torch.zeros(4 * max(count, 64), dtype=torch.int64).pin_memory()
                self._moves_copied = torch.cuda.Event()
            else:
                self._moves_copied.synchronize()  # the last moves' copy has left the buffer
            index = self._moves_host[: 4 * count]
        else:
            index = torch.empty(4 * count, dtype=torch.int64)
        host = index.numpy().reshape(4, count)
        np.divmod(slots, self.block_size, out=(host[:2], host[2:]))
        if self.device.type == "cuda":
            index = index.to(self.device, non_blocking=True)
            self._moves_copied.record()
        blocks, offsets = index.view(4, count)[:2], index.view(4, count)[2:]
        self._copy_slots(blocks, offsets)

    @torch.inference_mode()
    def move_accepted_paths(
        self, verification: Verification, inputs: StepInputs, max_depth: int
    ) -> bool:
        """Pack the accepted token-tree paths of ``verification`` (this runner's step of
        ``inputs``) on the device, right after the verification chose them: queued before the
        read-back, so the host neither waits for the paths nor uploads their slots. Draft
        ``j + 1``'s slot takes the KV of the accepted node ``j + 1`` deep; slots past the
        accepted count, and nodes already in place, copy onto themselves (the padding nodes
        are the root's row: the root onto itself); no path is longer than ``max_depth``
        (the trees' depth), so slots past it are left alone. The moves write only slots this
        step wrote, so they hold for a sequence that finished or stopped inside its run too.
        False (nothing moved) for chains, and where the KV is on other ranks too: there
        the host's :meth:`move_slots` sends the moves."""
        if verification.path is None or self.channel is not None or self.remote:
            return False
        width = verification.trees.width
        deepest = min(width - 1, max_depth)
        token_rows = inputs.logits_indices[verification.node_rows]
        slots = inputs.meta.slot_mapping[token_rows].view(-1, width)
        depths = torch.arange(1, deepest + 1, device=slots.device)
        path = verification.path[:, :deepest]
        nodes = torch.where(depths <= verification.count, path, depths)
        moves = torch.stack(
            (slots.gather(1, nodes).reshape(-1), slots[:, 1 : deepest + 1].reshape(-1))
        )
        blocks = torch.div(moves, self.block_size, rounding_mode="floor")
        self._copy_slots(blocks, moves - blocks * self.block_size)
        verification.moved_on_device = True
        return True

    def _copy_slots(self, blocks: torch.Tensor, offsets: torch.Tensor) -> None:
        """Every layer's K/V (and the stored hidden states) of slots ``(blocks[0],
        offsets[0])`` into ``(blocks[1], offsets[1])``, gathered before any is written."""
        self.kv_cache[blocks[1], :, :, offsets[1]] = self.kv_cache[blocks[0], :, :, offsets[0]]
        if self.hidden_store is not None:
            states = self.hidden_store.states
            states[blocks[1], offsets[1]] = states[blocks[0], offsets[0]]

    @torch.inference_mode()
    def execute(
        self,
        batch: ScheduledBatch,
        inputs: StepInputs,
        prev_sampled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the step; return fp32 logits ``[batch.num_logits, vocab]``.

        ``prev_sampled`` is the previous step's sampled tokens, read by pending rows.
        """
        input_ids = inputs.input_ids
        if inputs.pending_rows is not None or inputs.draft_tokens is not None:
            input_ids = input_ids.clone()
        if inputs.pending_rows is not None:
            assert prev_sampled is not None, "pending tokens need the previous step's tokens"
            input_ids[inputs.pending_rows] = prev_sampled[inputs.pending_src]
        drafts = inputs.draft_tokens
        if drafts is not None and inputs.draft_rows is not None:
            input_ids[inputs.draft_rows] = drafts.reshape(-1)[inputs.draft_src]
        elif drafts is not None:  # each sequence: its newest token, then all its drafts
            input_ids.view(drafts.shape[0], -1)[:, 1:] = drafts
        if self.channel is not None:
            assert inputs.broadcast is not None
            self.channel.send_step(*inputs.broadcast, input_ids, inputs.mm_embeds)
            if self.remote:
                return self.channel.recv_logits(batch.num_logits, self.model.config.vocab_size)
        logits = self.run_step(input_ids, inputs, batch.block_copies)
        assert logits is not None
        return logits

    @torch.inference_mode()
    def run_step(
        self, input_ids: torch.Tensor, inputs: StepInputs, block_copies: list[tuple[int, int]]
    ) -> torch.Tensor | None:
        """The forward pass of a step whose token ids are known: what every rank runs.
        Returns fp32 logits, or ``None`` on a rank other than the first."""
        for src, dst in block_copies:
            self.kv_cache[dst].copy_(self.kv_cache[src])
            if self.hidden_store is not None:
                self.hidden_store.states[dst].copy_(self.hidden_store.states[src])
        if self.lora_slots is not None:
            self.lora_slots.set(inputs.lora_token_slots)
        multimodal = inputs.mm_rows is not None or inputs.rope_positions is not None
        if self.graphs is not None and not multimodal and self.graphs.fits(inputs):
            hidden = self.graphs.replay(input_ids, inputs)
        elif multimodal:
            self.backend.prepare(inputs.meta, self.block_size)
            rope = inputs.rope_positions if inputs.rope_positions is not None else inputs.positions
            hidden = self.model(
                input_ids, rope, self.kv_cache, inputs.meta, inputs.mm_rows, inputs.mm_embeds
            )
        else:
            self.backend.prepare(inputs.meta, self.block_size)
            hidden = self.model(input_ids, inputs.positions, self.kv_cache, inputs.meta)
        self.last_hidden = hidden  # every row's final hidden state, for feature proposers
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        return logits.float() if logits is not None else None


def _add_tree_positions(
    drafts: DeviceDrafts,
    rows: torch.Tensor | None,
    src: torch.Tensor | None,
    positions: torch.Tensor,
    rope: torch.Tensor | None,
) -> None:
    """Depth-based positions for trees whose shape is on the device: draft ``m`` sits at
    cache index ``root + m`` but at rotary position ``root + depth``. ``rows`` / ``src``:
    the drafts' query rows and places in the flattened draft tensor (None: every sequence
    is its newest token then all its drafts)."""
    num, width = drafts.tokens.shape
    device = positions.device
    nodes = torch.arange(1, width + 1, device=device)
    offsets = (drafts.depths - nodes).reshape(-1)
    if rows is None:
        rows = (torch.arange(num, device=device)[:, None] * (width + 1) + nodes).reshape(-1)
    else:
        offsets = offsets[src]
    positions[rows] += offsets
    if rope is not None and rope is not positions:
        rope[..., rows] += offsets
