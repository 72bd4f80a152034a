"""Grammar masks for drafted positions: a constrained sample speculates too, chains and trees.

Verifying a draft tree needs the mask of every node, each after the drafts on the path to
it. The sample's matcher walks the tree depth first: at each node it fills the node's
bitmask row, then for each child the row allows, accepts the child's token, visits it and
rolls that token back, so that it ends where it started and
:meth:`Scheduler.update` advances it over what is accepted. A child the row forbids is
dropped with its subtree (the target, drawing under that mask, could never accept it), and
so are the children of a node that completes the grammar (the request stops there). A chain
is the tree whose drafts each hang under the one before.
"""

from __future__ import annotations

import torch

from engine_service.engine.batch import ScheduledBatch
from engine_service.engine.structured import GrammarMatcher, allocate_bitmask


def draft_grammar_masks(batch: ScheduledBatch, vocab_size: int) -> dict[int, torch.Tensor]:
    """Per sample row whose sequence carries drafts and a grammar: a host bitmask with one
    row per tree node (the root first). Drops from each such sequence's tree the drafts the
    grammar rules out."""
    masks: dict[int, torch.Tensor] = {}
    pruned_tokens: dict[int, list[int]] = {}
    pruned_parents: dict[int, list[int]] = {}
    for index, (_, request) in enumerate(batch.sample_rows):
        seq_index = batch.sample_seqs[index]
        seq = batch.sequences[seq_index]
        if request.grammar is None or not seq.draft_token_ids:
            continue
        tokens = seq.draft_token_ids
        parents = seq.draft_parents or list(range(len(tokens)))
        bitmask = allocate_bitmask(len(tokens) + 1, vocab_size, pin_memory=False)
        kept = sorted(_walk(request.grammar, tokens, parents, bitmask))
        masks[index] = bitmask[kept]
        if len(kept) <= len(tokens):
            renumbered = {old: new for new, old in enumerate(kept)}
            pruned_tokens[seq_index] = [tokens[node - 1] for node in kept[1:]]
            pruned_parents[seq_index] = [renumbered[parents[node - 1]] for node in kept[1:]]
    if pruned_tokens:
        batch.place_drafts(pruned_tokens, pruned_parents)
    return masks


def _walk(
    matcher: GrammarMatcher, tokens: list[int], parents: list[int], bitmask: torch.Tensor
) -> list[int]:
    """Fill ``bitmask`` row ``i`` with node ``i``'s mask for every node the grammar allows
    (the matcher ends where it began); the nodes kept, the root (0) included."""
    children: list[list[int]] = [[] for _ in range(len(tokens) + 1)]
    for node, parent in enumerate(parents, start=1):
        children[parent].append(node)
    kept = [0]

    def visit(node: int) -> None:
        matcher.fill_bitmask(bitmask, node)
        for child in children[node]:
            token = tokens[child - 1]
            if not (int(bitmask[node, token // 32]) >> (token % 32)) & 1:
                continue
            if not matcher.accept_token(token):
                raise RuntimeError(f"a grammar matcher refused draft {token} its mask allowed")
            kept.append(child)
            if not matcher.is_terminated():
                visit(child)
            matcher.rollback(1)

    visit(0)
    return kept
