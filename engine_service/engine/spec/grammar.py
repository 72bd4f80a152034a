"""Grammar masks for drafted positions: a constrained sample speculates too.

Verifying drafts ``d_1 .. d_k`` needs the mask of every position, each after the drafts
before it. The sample's matcher walks the drafts once, filling one bitmask row per position
and stopping at the first draft the grammar forbids (the drafts after it are dropped: the
target could never accept them) or that completes the grammar; then it rolls back, so the
matcher is where it was and :meth:`Scheduler.update` advances it over what is accepted.
"""

from __future__ import annotations

import torch

from engine_service.engine.batch import ScheduledBatch
from engine_service.engine.structured import allocate_bitmask


def draft_grammar_masks(batch: ScheduledBatch, vocab_size: int) -> dict[int, torch.Tensor]:
    """Per sample row whose sequence carries drafts and a grammar: a host bitmask of
    ``len(drafts) + 1`` rows. Trims each such sequence's drafts to what the grammar allows."""
    masks: dict[int, torch.Tensor] = {}
    trimmed: dict[int, list[int]] = {}
    for index, (_, request) in enumerate(batch.sample_rows):
        seq_index = batch.sample_seqs[index]
        seq = batch.sequences[seq_index]
        matcher = request.grammar
        if matcher is None or not seq.draft_token_ids:
            continue
        drafts = seq.draft_token_ids
        bitmask = allocate_bitmask(len(drafts) + 1, vocab_size, pin_memory=False)
        walked = 0
        matcher.fill_bitmask(bitmask, 0)
        # Only drafts the grammar allows are fed: a refused token would break the matcher.
        for draft in drafts[: matcher.num_acceptable(drafts)]:
            if not matcher.accept_token(draft):
                raise RuntimeError(f"a grammar matcher refused draft {draft} it had validated")
            walked += 1
            if matcher.is_terminated():
                break
            matcher.fill_bitmask(bitmask, walked)
        if walked:
            matcher.rollback(walked)
        if walked < len(drafts):
            trimmed[seq_index] = drafts[:walked]
        masks[index] = bitmask[: walked + 1]
    if trimmed:
        batch.place_drafts(trimmed)
    return masks
