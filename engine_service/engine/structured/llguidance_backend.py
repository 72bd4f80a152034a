"""The default grammar backend, on llguidance (JSON Schema, regex and Lark grammars)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import llguidance
import torch

from engine_service.engine.structured.backend import GrammarBackend, GrammarMatcher
from engine_service.engine.structured.spec import (
    JSON_ITEM_SEPARATOR,
    JSON_KEY_SEPARATOR,
    GrammarSpec,
)

_JSON_OPTIONS: llguidance.JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": JSON_ITEM_SEPARATOR,
    "key_separator": JSON_KEY_SEPARATOR,
}


class LLGuidanceMatcher(GrammarMatcher):
    __slots__ = ("_matcher",)
    backend = "llguidance"

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        target = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)

    def accept_token(self, token_id: int) -> bool:
        return self._matcher.consume_token(token_id)

    def num_acceptable(self, token_ids: list[int]) -> int:
        return self._matcher.validate_tokens(token_ids)

    def rollback(self, num_tokens: int) -> None:
        if not self._matcher.rollback(num_tokens):
            raise RuntimeError(f"llguidance cannot roll back {num_tokens} tokens")

    def is_terminated(self) -> bool:
        # Stopped: the grammar is complete and admits no further byte, only EOS.
        return self._matcher.is_stopped()

    def forced_bytes(self) -> bytes:
        return self._matcher.compute_ff_bytes()

    def copy(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self._matcher.deep_copy())


class LLGuidanceBackend(GrammarBackend):
    """llguidance rejects unknown or unenforceable JSON Schema keywords (it is not lenient)."""

    name = "llguidance"

    def __init__(self, tokenizer: llguidance.LLTokenizer) -> None:
        self._tokenizer = tokenizer
        self._executor = llguidance.LLExecutor()

    def compile(self, spec: GrammarSpec) -> LLGuidanceMatcher:
        if spec.kind == "json_schema":
            try:
                schema = json.loads(spec.value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"the JSON schema is not valid JSON: {exc}") from exc
            if not isinstance(schema, dict | bool):
                raise ValueError("the JSON schema must be a JSON object")
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        elif spec.kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                {"type": "object"}, defaults=_JSON_OPTIONS
            )
        elif spec.kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(spec.value)
        else:
            grammar = llguidance.LLMatcher.grammar_from_lark(spec.value)
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid {spec.kind.replace('_', ' ')}: {matcher.get_error()}")
        return LLGuidanceMatcher(matcher)

    def fill_bitmasks(
        self, matchers: Sequence[tuple[GrammarMatcher, int]], bitmask: torch.Tensor
    ) -> None:
        # One call for the whole batch: llguidance spreads the rows over its own threads.
        pairs = [(m._matcher, row) for m, row in matchers if isinstance(m, LLGuidanceMatcher)]
        assert len(pairs) == len(matchers) and bitmask.is_contiguous()
        num_rows, num_words = bitmask.shape
        self._executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), num_words * 4, num_rows)
