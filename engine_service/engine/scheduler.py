"""The scheduler: which sequences run this step and how many of their tokens, and the one
place where a step's results become request progress (:meth:`Scheduler.update`).

There are no separate prefill and decode phases. Every sequence has tokens it still has to
compute (a whole prompt, a chunk of one, or the one newest sampled token), and a step hands
out a token budget: running sequences first, in priority order, then waiting ones. A long
prompt takes what is left of the budget and finishes over several steps (chunked prefill), so
running decodes are never stalled behind it. When the KV pool runs dry, the lowest-priority
running sequence is preempted: its blocks are freed and it is recomputed later.

A new sequence starts from the longest prefix it finds cached: in the device prefix cache,
then in the offload tiers (:mod:`engine_service.engine.offload`). A sequence whose prefix
is being fetched from the remote store waits aside in ``loading`` and rejoins the waiting
queue, in its old place, once the fetch is done; the steps go on meanwhile.

With overlapped scheduling the engine schedules step N+1 while step N is still running: a
sequence whose newest token step N is sampling counts that token as known
(``num_pending_tokens``) and computes it in N+1, reading its id from N's device tensor.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from engine_service.engine.batch import SampledTokens, ScheduledBatch, ScheduledSequence
from engine_service.engine.config import EngineConfig
from engine_service.engine.kv_cache import KVCacheManager
from engine_service.engine.kv_events import KVTier
from engine_service.engine.kv_handoff import KVExport, KVImport
from engine_service.engine.multimodal import spans_in_chunk
from engine_service.engine.offload import OffloadManager, Restore
from engine_service.engine.progress import TokenAcceptor
from engine_service.engine.request import Request, RequestStatus


class Scheduler:
    """Owns the waiting queue and the running list; the KV manager owns their blocks."""

    def __init__(
        self,
        config: EngineConfig,
        kv_manager: KVCacheManager,
        offload: OffloadManager | None = None,
        acceptor: TokenAcceptor | None = None,
    ) -> None:
        self.config = config
        self.kv = kv_manager
        self.offload = offload
        self.acceptor = acceptor or TokenAcceptor(max_model_len=1 << 62)
        # Speculative decoding: draft slots per decoding sequence, and what verification kept.
        # With ``size_trees`` (token trees under a batch budget), a step's slots per sequence
        # are ``size_trees(number of decoding sequences)`` instead, and the batch carries it.
        self.num_speculative_tokens = 0
        self.size_trees: Callable[[int], int] | None = None
        self.num_drafts = 0
        self.draft_tokens = 0
        self.accepted_draft_tokens = 0
        self.accepted_per_position: list[int] = [0] * 64
        # Accepted token-tree nodes whose KV moved to pack the path (a test's witness).
        self.tree_tokens_moved = 0
        self._waiting: list[tuple[tuple[int, int, int], Request]] = []
        self.running: list[Request] = []
        self.loading: list[Request] = []
        # Disaggregation (decode side): requests whose prompt KV comes from a prefill engine,
        # in arrival order; reserved ones hold their prompt's blocks while it arrives.
        self.importing: list[Request] = []
        self._reserved_now: list[Request] = []
        self.num_preemptions = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        # Prompt tokens restored from the offload tiers, and tokens admitted sequences had
        # to compute (re-admissions after preemption count again).
        self.host_hit_tokens = 0
        self.remote_hit_tokens = 0
        self.recomputed_tokens = 0

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + len(self.loading) + len(self.importing) - self.num_reserved

    @property
    def num_reserved(self) -> int:
        """Importing requests that hold their blocks (they run once their KV is in)."""
        return sum(1 for r in self.importing if r.kv_handoff.reserved)

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self._push_waiting(request)

    def add_importing(self, request: Request) -> None:
        """Queue a request whose prompt KV a prefill engine computes: its blocks are
        reserved in arrival order, and it runs once :meth:`complete_import` is called."""
        request.status = RequestStatus.WAITING
        request.kv_handoff = KVImport()
        self.importing.append(request)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self.running or self.loading or self.importing)

    def only_awaiting_kv(self) -> bool:
        """Whether everything unfinished is reserved and waiting for its KV: no step can
        make progress until a transfer delivers."""
        return (
            bool(self.importing)
            and not (self._waiting or self.running or self.loading)
            and self.num_reserved == len(self.importing)
        )

    def take_reservations(self) -> list[Request]:
        """Importing requests that got their blocks since the last call."""
        reserved, self._reserved_now = self._reserved_now, []
        return [r for r in reserved if r in self.importing]

    # -- schedule -------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        if self.offload is not None:
            for request in self.offload.poll():
                if request in self.loading:
                    self.loading.remove(request)
                    self._push_waiting(request)
        # Budget and protection from preemption go to running sequences in priority order.
        self.running.sort(key=lambda r: (r.sort_key, r.index))

        slots = self._step_draft_slots()
        if self.size_trees is not None:
            batch.tree_size = slots
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            remaining = self._num_remaining(request)
            num_new = self._chunk(request, remaining, budget)
            if num_new == 0:
                i += 1
                continue
            # No drafts on a prompt's last token while its other samples (n > 1) wait to
            # fork from it: they share its row, and a draft run can be one sample's only.
            room = (
                self._draft_room(request, budget - num_new, slots)
                if num_new == remaining == 1 and not request.pending_forks
                else 0
            )
            while not self.kv.allocate_slots(request, num_new + room):
                victim = self._pick_victim(i)
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is request:
                    break
            else:
                self._add_sequence(batch, request, num_new, room)
                budget -= num_new + room
                i += 1

        # Samples still to fork from a running prompt (n > 1) take their seats when it ends.
        forking = sum(len(r.pending_forks) for r in self.running)
        if self.importing and not batch.preempted:
            self._reserve_imports(forking)
        num_reserved = self.num_reserved
        # New work waits while the pool is too tight to keep what already runs.
        while self._waiting and not batch.preempted and budget > 0:
            request = self._waiting[0][1]
            if request.num_pending_tokens:
                break  # preempted while its token was in flight: admit once it is known
            # Its pending samples join the running list when its prompt is done; reserved
            # imports will join it too.
            seats = len(self.running) + forking + num_reserved + 1 + len(request.pending_forks)
            if seats > self.config.max_num_seqs:
                break
            computed_blocks: list[int] = []
            restores: list[Restore] = []
            looked_up = request.num_computed_tokens == 0 and not request.block_table
            if looked_up:
                computed_blocks = self.kv.get_computed_blocks(request)
                if self.offload is not None:
                    hashes = self.kv.hashes_after_prefix(request, len(computed_blocks))
                    found = self.offload.lower_tier_hits(request, hashes) if hashes else []
                    if found is None:
                        heapq.heappop(self._waiting)
                        self.loading.append(request)
                        continue
                    restores = found
            size = self.kv.block_size
            num_cached = (len(computed_blocks) + len(restores)) * size
            num_new = self._chunk(request, request.num_tokens - num_cached, budget)
            if num_new == 0:
                break
            if not self.kv.allocate_slots(request, num_new, computed_blocks, len(restores)):
                break
            heapq.heappop(self._waiting)
            if num_cached:
                request.num_computed_tokens = num_cached
            if self.offload is not None and looked_up:
                # Also without restores: what the request fetched is dropped either way.
                first = len(computed_blocks)
                block_ids = request.block_table[first : first + len(restores)]
                self.offload.restore(request, restores, block_ids)
            self.recomputed_tokens += request.num_tokens - num_cached
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += len(computed_blocks) * size
                from_host = sum(1 for r in restores if r.tier is KVTier.HOST)
                self.host_hit_tokens += from_host * size
                self.remote_hit_tokens += (len(restores) - from_host) * size
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add_sequence(batch, request, num_new)
            forking += len(request.pending_forks)  # the ones its step did not fork yet
            budget -= num_new

        batch.block_copies = self.kv.take_block_copies()
        return batch

    def _reserve_imports(self, forking: int) -> None:
        """Give importing requests, in arrival order, blocks for their whole prompt: cached
        ones from the prefix cache (they need not be sent), fresh ones for the rest;
        ``forking``: the running prompts' samples still to fork, whose seats are taken."""
        seats = len(self.running) + forking + self.num_reserved
        for request in self.importing:
            state = request.kv_handoff
            if state.reserved:
                continue
            if seats + 1 > self.config.max_num_seqs:
                return
            computed_blocks = self.kv.get_computed_blocks(request)
            num_cached = len(computed_blocks) * self.kv.block_size
            if not self.kv.allocate_slots(
                request, request.num_tokens - num_cached, computed_blocks
            ):
                return
            request.num_computed_tokens = num_cached
            state.reserved = True
            state.num_held_blocks = state.next_block = len(computed_blocks)
            seats += 1
            self._reserved_now.append(request)

    def complete_import(self, request: Request) -> None:
        """Its prompt's KV is in: the request runs from here, with nothing to compute until
        its first token (already accepted) needs KV."""
        self.importing.remove(request)
        state = request.kv_handoff
        request.kv_handoff = None
        request.num_computed_tokens = request.num_prompt_tokens
        request.num_cached_tokens = state.num_held_blocks * self.kv.block_size
        self.prefix_cache_queries += request.num_prompt_tokens
        self.prefix_cache_hits += request.num_cached_tokens
        self.kv.commit_computed_blocks(request, request.num_prompt_tokens)
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def fail_import(self, request: Request) -> None:
        """Its transfer failed: free what it reserved and queue it to compute its prompt
        here like any other request."""
        self.importing.remove(request)
        self.kv.free(request)
        request.kv_handoff = None
        request.num_computed_tokens = 0
        self.add(request)

    def _num_remaining(self, request: Request) -> int:
        """Tokens a running sequence still has to compute; 0 when the token in flight will
        end it anyway (its length limit, or a prefill engine's export, which ends with its
        first token), so no step is spent past the end. A step for an export would also
        draw from a seeded request's generator before the prefill hands its state over."""
        if request.num_pending_tokens:
            if request.needs_host_tokens or isinstance(request.kv_handoff, KVExport):
                return 0
            done = request.num_output_tokens + request.num_pending_tokens
            if (
                done >= request.params.max_tokens
                or request.num_tokens_with_pending >= self.acceptor.max_model_len
            ):
                return 0
        return request.num_tokens_with_pending - request.num_computed_tokens

    def _step_draft_slots(self) -> int:
        """Draft slots each decoding sequence of this step may take: the configured number,
        or with ``size_trees``, the tree size for as many trees as running sequences could
        decode this step. That count is an upper bound on the trees the step drafts (some
        get no room or are preempted), and a tree's size never grows with the count, so the
        proposer can give every tree of the step this size."""
        k = self.num_speculative_tokens
        if not k or self.size_trees is None:
            return k
        # Sequences on their last token or at the context's end draft nothing: not counted.
        decoding = sum(
            1
            for r in self.running
            if not r.num_pending_tokens
            and r.kv_handoff is None
            and self._room_left(r) > 0
            and self._num_remaining(r) == 1
        )
        return self.size_trees(max(decoding, 1))

    def _room_left(self, request: Request) -> int:
        """Tokens a decoding request may still draft past its next one: its max_tokens and
        the context allow this many."""
        return min(
            request.params.max_tokens - request.num_output_tokens - 1,
            self.acceptor.max_model_len - request.num_tokens - 1,
        )

    def _draft_room(self, request: Request, budget: int, slots: int) -> int:
        """Draft slots for a decoding sequence: the step's number (``slots``), within the step's
        budget, the request's max_tokens and the context; none while a token is in flight.
        Grammars compose (a mask per drafted node,
        :mod:`engine_service.engine.spec.grammar`), so do min_tokens (stop tokens held back
        by depth, :func:`engine_service.engine.spec.verify.hold_back_stops`) and penalties
        (each node counts the drafts on its path,
        :func:`~engine_service.engine.spec.verify.add_path_counts`), in chains and trees."""
        if not slots or request.num_pending_tokens or request.kv_handoff is not None:
            return 0
        return max(0, min(slots, budget, self._room_left(request)))

    def _add_sequence(
        self, batch: ScheduledBatch, request: Request, num_new: int, draft_room: int = 0
    ) -> None:
        start = request.num_computed_tokens
        end = start + num_new
        reaches_end = end == request.num_tokens_with_pending
        seq = ScheduledSequence(
            request=request,
            start=start,
            num_tokens=num_new,
            num_logits=1 if reaches_end else 0,
            epoch=request.num_preemptions,
            adapter_slot=request.adapter_slot,
            pending_row=request.pending_row if reaches_end and request.num_pending_tokens else -1,
            draft_room=draft_room,
        )
        if request.mm_inputs:
            seq.mm_spans = spans_in_chunk(request.mm_inputs, start, end)
        batch.sequences.append(seq)
        batch.num_tokens += num_new
        # Counted at once, so that the next step (scheduled while this one may still run)
        # starts after it; draft tokens only count once accepted.
        request.num_computed_tokens = start + seq.num_known_tokens
        if seq.num_logits:
            row = batch.num_logits
            batch.num_logits += seq.num_logits
            # A prompt finishing with pending samples (n > 1) forks them now: they share its
            # blocks (computed by this very step) and draw their first token from its row.
            forks = self.start_forks(request, end) if request.pending_forks else []
            for sample in (request, *forks):
                batch.sample_rows.append((row, sample))
                batch.sample_seqs.append(len(batch.sequences) - 1)

    def mark_in_flight(self, batch: ScheduledBatch) -> None:
        """The batch's samples are being drawn by a step still running (overlap): count
        each one's token as pending until :meth:`update` commits it."""
        for row, (_, request) in enumerate(batch.sample_rows):
            request.num_pending_tokens += 1
            request.pending_row = row

    # -- update ---------------------------------------------------------------------------

    def update(self, batch: ScheduledBatch, sampled: SampledTokens) -> list[Request]:
        """Commit a finished step: progress, accepted tokens, prefix-cache blocks, finishes.

        Returns every sample that received tokens or finished, in batch order. A sequence
        aborted while the step ran is skipped; one preempted meanwhile keeps its sampled
        token (it is valid) but none of the step's computed KV, which was freed.
        """
        for seq in batch.sequences:
            request = seq.request
            if request.is_finished or seq.epoch != request.num_preemptions:
                continue
            # Only now, with the step's KV written, do its full blocks enter the cache.
            self.kv.commit_computed_blocks(request, seq.start + seq.num_known_tokens)

        touched: list[Request] = []
        for index, (_, request) in enumerate(batch.sample_rows):
            if request.num_pending_tokens:
                # The step after this one may already be in flight with its own token.
                request.num_pending_tokens -= 1
                if not request.num_pending_tokens:
                    request.pending_row = -1
            if request.is_finished:
                continue
            if isinstance(request.kv_handoff, KVExport):
                # A prefill engine's request ends with its first token, as sampled: the decode
                # engine's grammar jumps forward from it.
                token, logprob = sampled.token_list[index], sampled.logprobs[index]
                self.acceptor.accept(request, token, logprob, jump_forward=False)
                if not request.is_finished:
                    request.finish("length")
            elif sampled.token_lists is None:
                self.acceptor.accept(request, sampled.token_list[index], sampled.logprobs[index])
            else:
                seq = batch.sequences[batch.sample_seqs[index]]
                logprobs = sampled.logprob_lists[index] if sampled.logprob_lists else None
                self._accept_verified(
                    request, seq, sampled.token_lists[index], logprobs, sampled.paths_moved
                )
            if request.is_finished:
                self.finish(request)
            touched.append(request)
        return touched

    def _accept_verified(
        self,
        request: Request,
        seq: ScheduledSequence,
        tokens: list[int],
        logprobs: list | None = None,
        paths_moved: bool = False,
    ) -> None:
        """Commit sample ``request``'s run: the accepted drafts (their KV is already written)
        and the token after them; cut at the first token that ends the sample. The rejected
        drafts' slots are freed; only blocks full of committed tokens enter the prefix
        cache. A sequence's forks (n > 1) are sample rows of its step with one token each:
        ``request`` is the row's own sample, not the sequence's (which is the first).
        ``paths_moved``: the accepted tree path's KV is packed already (on the device)."""
        assert request is seq.request or not seq.draft_token_ids, "drafts are one sample's"
        for position, token in enumerate(tokens):
            logprob = logprobs[position] if logprobs and position < len(logprobs) else None
            # Jump-forward only after the run's last token: the others have KV already.
            last = position == len(tokens) - 1
            self.acceptor.accept(request, token, logprob, jump_forward=last)
            if request.is_finished:
                break
        if seq.draft_token_ids:
            verified = len(tokens) - 1  # drafts the target agreed with
            self.accepted_draft_tokens += verified
            self.draft_tokens += len(seq.draft_token_ids)
            self.num_drafts += 1
            for position in range(verified):
                self.accepted_per_position[position] += 1
            if request.is_finished or seq.epoch != request.num_preemptions:
                return
            first = seq.start + seq.num_known_tokens  # cache index of draft 1
            if seq.is_tree:
                # Pack the accepted path (draft numbers, 1-based) right after the known tokens.
                moves = [
                    (first + node - 1, first + j)
                    for j, node in enumerate(seq.accepted_path[:verified])
                    if node - 1 != j
                ]
                if not paths_moved:
                    self.kv.move_tokens(request, moves)
                self.tree_tokens_moved += len(moves)
            request.num_computed_tokens = first + verified
            self.kv.truncate(request, request.num_computed_tokens)
            self.kv.commit_computed_blocks(request, request.num_computed_tokens)

    # -- lifecycle ------------------------------------------------------------------------

    def finish(self, request: Request) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.loading:
            self.loading.remove(request)
        elif request in self.importing:
            self.importing.remove(request)
        elif any(r is request for _, r in self._waiting):
            self._waiting = [(k, r) for k, r in self._waiting if r is not request]
            heapq.heapify(self._waiting)
        self.kv.free(request)
        if self.offload is not None:
            self.offload.forget(request)
        for fork in request.pending_forks:
            self.kv.free(fork)
        request.pending_forks = []

    def start_forks(self, parent: Request, num_computed: int) -> list[Request]:
        """Turn the parent's pending samples into running sequences sharing its blocks;
        ``num_computed``: the prompt tokens whose KV they share (once the step that
        computes the prompt's end has run). They join the running list after the parent,
        with nothing to compute until their first token is sampled."""
        children = parent.pending_forks
        parent.pending_forks = []
        for child in children:
            self.kv.fork(parent, child)
            child.num_computed_tokens = num_computed
            child.num_cached_tokens = parent.num_cached_tokens
            child.status = RequestStatus.RUNNING
            self.running.append(child)
        return children

    def truncate(self, request: Request, num_tokens: int) -> None:
        """Drop a sequence's tail past ``num_tokens`` (rejected draft tokens): its tokens,
        its computed count and the blocks beyond; cached blocks are untouched."""
        del request.all_token_ids[num_tokens:]
        request.num_computed_tokens = min(request.num_computed_tokens, num_tokens)
        self.kv.truncate(request, request.num_computed_tokens)

    def _chunk(self, request: Request, num_remaining: int, budget: int) -> int:
        num_new = num_remaining
        threshold = self.config.long_prefill_token_threshold
        if threshold > 0:
            num_new = min(num_new, threshold)
        if num_new > budget:
            # Without chunked prefill, a prompt waits until it fits in one step.
            num_new = budget if self.config.enable_chunked_prefill else 0
        return num_new

    def _pick_victim(self, current: int) -> Request:
        """The lowest-priority, latest-arrived running sequence not yet scheduled this step."""
        candidates = self.running[current:]
        return max(candidates, key=lambda r: (r.sort_key, r.index))

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.num_preemptions += 1
        self._push_waiting(request)

    def _push_waiting(self, request: Request) -> None:
        key = (*request.sort_key, request.index)
        heapq.heappush(self._waiting, (key, request))
