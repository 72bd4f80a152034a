"""``--speculative-config``: vLLM's JSON keys, checked once at start.

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    {"method": "draft_model", "model": PATH_OR_ID, "num_speculative_tokens": 4}
    {"model": PATH_OR_ID, "num_speculative_tokens": 4}          # draft_model too

    {"method": "eagle", "model": EAGLE_HEAD, "num_speculative_tokens": 4}     # EAGLE-1 head
    {"method": "eagle3", "model": EAGLE3_HEAD, "num_speculative_tokens": 4}   # EAGLE-3 head

    {"model": PATH, "num_speculative_tokens": 4, "tree": {"topk": 2, "num_draft_tokens": 8}}
    # trees shrink when a step's trees would verify more than 64 nodes together
    {"model": PATH, "num_speculative_tokens": 4,
     "tree": {"topk": 2, "num_draft_tokens": 8, "max_num_batched_draft_tokens": 64}}
    {"method": "mtp", "num_speculative_tokens": 1}     # the target's own MTP layers (DeepSeek-V3)

    # under --tensor-parallel-size N: a draft model splits like the target, or stays whole
    # on the first rank with
    {"model": PATH, "num_speculative_tokens": 4, "draft_tensor_parallel_size": 1}

Methods not built yet are refused with that reason, so a config never silently runs
something else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_METHODS = ("ngram", "draft_model", "eagle", "eagle3", "mtp")
PLANNED_METHODS: tuple[str, ...] = ()
# Methods whose "model" is a checkpoint that drafts (and so can draft trees).
MODEL_METHODS = ("draft_model", "eagle", "eagle3")
_KEYS = {
    "method",
    "model",
    "num_speculative_tokens",
    "prompt_lookup_min",
    "prompt_lookup_max",
    "tree",
    "draft_tensor_parallel_size",
}
_TREE_KEYS = {"topk", "num_draft_tokens", "max_num_batched_draft_tokens"}


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    model: str | None = None
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    # Token trees (SGLang's --speculative-eagle-topk / --speculative-num-draft-tokens): the
    # branching at each node and the tree's size; 0: chains.
    tree_topk: int = 0
    tree_size: int = 0
    # The most tree nodes one step verifies over its whole batch (0: no limit): past it,
    # each tree gets fewer nodes (:func:`~engine_service.engine.spec.proposers.step_tree_size`).
    tree_batch_tokens: int = 0
    # vLLM's key: 1 keeps a draft model whole on the first tensor-parallel rank; None or the
    # target's size splits it like the target.
    draft_tensor_parallel_size: int | None = None

    def steps_on_every_rank(self, tensor_parallel_size: int) -> bool:
        """Whether the proposer's model runs on every tensor-parallel rank, the first rank
        sending each of its steps to the others: the MTP layers and a draft model split like
        the target (a draft model whole on the first rank alone with
        ``draft_tensor_parallel_size`` 1), an EAGLE head whole on each rank beside the
        target's vocabulary-parallel embedding and ``lm_head``. No for n-gram lookup, and
        with one rank."""
        if tensor_parallel_size == 1 or self.method == "ngram":
            return False
        return self.method != "draft_model" or self.draft_tensor_parallel_size != 1

    def check_parallel(self, tensor_parallel_size: int, data_parallel_size: int) -> None:
        """``ValueError`` for what this proposer cannot do over several ranks."""
        if self.method == "mtp" and data_parallel_size > 1:
            raise ValueError(
                'speculative method "mtp" is not supported with data_parallel_size > 1 yet: '
                "the MTP proposer keeps each request's target hidden states in the first "
                "rank's process, and a data-parallel rank computes its own elsewhere"
            )
        tp, draft_tp = tensor_parallel_size, self.draft_tensor_parallel_size
        if draft_tp is None or self.method == "ngram":
            return
        if draft_tp not in (1, tp):
            raise ValueError(
                f"draft_tensor_parallel_size must be 1 (the draft whole on the first rank) "
                f"or the target's tensor_parallel_size {tp}, got {draft_tp}"
            )
        if draft_tp == 1 and tp > 1 and self.method != "draft_model":
            what = "the MTP layers run" if self.method == "mtp" else "an EAGLE head runs"
            raise ValueError(
                f"{what} on every tensor-parallel rank (beside the target's "
                f"vocabulary-parallel embedding and lm_head): draft_tensor_parallel_size "
                f"must be {tp} or left out"
            )
        if draft_tp == 1 and tp > 1 and data_parallel_size > 1:
            raise ValueError(
                "draft_tensor_parallel_size 1 is not supported with data_parallel_size > 1: "
                "each data-parallel rank's draft splits over its tensor-parallel group"
            )

    @classmethod
    def parse(cls, value: str | dict[str, Any]) -> SpeculativeConfig:
        """From the flag's JSON text (or an already-parsed dict); ``ValueError`` names what
        is wrong."""
        if isinstance(value, str):
            try:
                raw = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--speculative-config is not valid JSON: {exc}") from None
        else:
            raw = dict(value)
        if not isinstance(raw, dict):
            raise ValueError("--speculative-config must be a JSON object")
        unknown = set(raw) - _KEYS
        if unknown:
            raise ValueError(f"--speculative-config has unknown keys: {sorted(unknown)}")
        method = raw.get("method") or ("draft_model" if raw.get("model") else None)
        if method is None:
            raise ValueError('--speculative-config needs "method" (or a draft "model")')
        if method in PLANNED_METHODS:
            raise ValueError(
                f"speculative method {method!r} is not supported by this engine yet; "
                f"supported methods: {', '.join(SUPPORTED_METHODS)}"
            )
        if method not in SUPPORTED_METHODS:
            raise ValueError(
                f"unknown speculative method {method!r}; supported: {', '.join(SUPPORTED_METHODS)}"
            )
        k = raw.get("num_speculative_tokens")
        if not isinstance(k, int) or not 1 <= k <= 16:
            raise ValueError("num_speculative_tokens must be an integer from 1 to 16")
        if method in MODEL_METHODS and not raw.get("model"):
            what = "the draft checkpoint" if method == "draft_model" else "the EAGLE head"
            raise ValueError(f'method "{method}" needs "model": {what}')
        low = raw.get("prompt_lookup_min", raw.get("prompt_lookup_max", 1))
        high = raw.get("prompt_lookup_max", max(low, 4))
        if method == "ngram" and not (
            isinstance(low, int) and isinstance(high, int) and 1 <= low <= high
        ):
            raise ValueError("prompt_lookup_min and prompt_lookup_max must be 1 <= min <= max")
        tree_topk = tree_size = tree_batch_tokens = 0
        tree = raw.get("tree")
        if tree is not None:
            if method not in MODEL_METHODS:
                raise ValueError(
                    f'"tree" needs a model-based draft ({", ".join(MODEL_METHODS)}); '
                    "ngram and mtp draft chains"
                )
            if not isinstance(tree, dict) or set(tree) - _TREE_KEYS:
                raise ValueError(
                    '"tree" takes {"topk": K, "num_draft_tokens": N} and optionally '
                    '"max_num_batched_draft_tokens"'
                )
            tree_topk, tree_size = tree.get("topk"), tree.get("num_draft_tokens")
            if not (isinstance(tree_topk, int) and isinstance(tree_size, int)):
                raise ValueError('"tree" needs integer "topk" and "num_draft_tokens"')
            if not 1 <= tree_topk <= 8 or not tree_topk <= tree_size <= 64:
                raise ValueError("tree topk must be 1-8 and num_draft_tokens from topk to 64")
            tree_batch_tokens = tree.get("max_num_batched_draft_tokens", 0)
            if not isinstance(tree_batch_tokens, int) or (
                tree_batch_tokens and tree_batch_tokens < tree_size
            ):
                raise ValueError(
                    "tree max_num_batched_draft_tokens must be an integer of at least "
                    f"num_draft_tokens ({tree_size}): a lone request gets the whole tree"
                )
        draft_tp = raw.get("draft_tensor_parallel_size")
        if draft_tp is not None and not (isinstance(draft_tp, int) and draft_tp >= 1):
            raise ValueError("draft_tensor_parallel_size must be a positive integer")
        return cls(
            method, k, raw.get("model"), low, high, tree_topk, tree_size,
            draft_tensor_parallel_size=draft_tp,
            tree_batch_tokens=tree_batch_tokens,
        )  # fmt: skip


def check_same_tokenizer(target: Path, draft: Path, target_vocab: int, draft_vocab: int) -> None:
    """A draft model must speak the target's tokens: same vocabulary size, and the same
    tokenizer file where both checkpoints ship one."""
    if target_vocab != draft_vocab:
        raise ValueError(
            f"the draft model's vocabulary ({draft_vocab} tokens) differs from the target's "
            f"({target_vocab}): the two must share a tokenizer"
        )
    files = [p / "tokenizer.json" for p in (target, draft)]
    if all(f.exists() for f in files):
        digests = {hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
        if len(digests) > 1:
            raise ValueError("the draft model's tokenizer.json differs from the target's")
