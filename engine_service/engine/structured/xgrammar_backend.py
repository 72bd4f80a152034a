"""The second grammar backend, on xgrammar.

xgrammar compiles JSON Schema keywords it cannot enforce without complaint, so this module
checks a schema against the keywords it does enforce first and refuses the rest: a request
must never get a weaker constraint than it asked for.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
import xgrammar

from engine_service.engine.structured.backend import GrammarBackend, GrammarMatcher
from engine_service.engine.structured.spec import (
    JSON_ITEM_SEPARATOR,
    JSON_KEY_SEPARATOR,
    GrammarSpec,
)

# Keywords whose value is one subschema, a name -> subschema map, or a list of subschemas.
_SUBSCHEMA = frozenset({"items", "additionalProperties", "propertyNames"})
_SUBSCHEMA_MAP = frozenset({"properties", "$defs", "definitions", "patternProperties"})
_SUBSCHEMA_LIST = frozenset({"anyOf", "oneOf", "prefixItems"})
_CONSTRAINTS = frozenset(
    {
        "type", "enum", "const", "required", "$ref",
        "minItems", "maxItems", "minLength", "maxLength", "pattern",
        "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
        "minProperties", "maxProperties", "format",
    }
)  # fmt: skip
_ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment"}
)
_KNOWN = _SUBSCHEMA | _SUBSCHEMA_MAP | _SUBSCHEMA_LIST | _CONSTRAINTS | _ANNOTATIONS
_FORMATS = frozenset(
    {"date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uuid"}
)
# xgrammar's C++ errors start with a timestamp and a source location.
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


def check_enforceable(schema: Any, path: str = "#") -> None:
    """Raise ``ValueError`` naming the first keyword xgrammar would not enforce."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"{path}: a schema must be an object or a boolean")
    for key, value in schema.items():
        where = f"{path}/{key}"
        if key not in _KNOWN:
            raise ValueError(f"{where}: the xgrammar backend cannot enforce {key!r}")
        if key == "format" and value not in _FORMATS:
            raise ValueError(f"{where}: the xgrammar backend cannot enforce format {value!r}")
        if key in _SUBSCHEMA and isinstance(value, dict | bool):
            check_enforceable(value, where)
        elif key in _SUBSCHEMA_MAP and isinstance(value, dict):
            for name, subschema in value.items():
                check_enforceable(subschema, f"{where}/{name}")
        elif key in _SUBSCHEMA_LIST and isinstance(value, list):
            for i, subschema in enumerate(value):
                check_enforceable(subschema, f"{where}/{i}")


class XGrammarMatcher(GrammarMatcher):
    __slots__ = ("_matcher",)
    backend = "xgrammar"

    def __init__(self, matcher: xgrammar.GrammarMatcher) -> None:
        self._matcher = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept_token(self, token_id: int) -> bool:
        return self._matcher.accept_token(token_id)

    def num_acceptable(self, token_ids: list[int]) -> int:
        accepted = 0
        for token_id in token_ids:
            if not self._matcher.accept_token(token_id):
                break
            accepted += 1
        if accepted:
            self._matcher.rollback(accepted)
        return accepted

    def rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)

    def is_terminated(self) -> bool:
        # Only after the EOS token: xgrammar has no cheap "nothing but EOS may follow".
        return self._matcher.is_terminated()

    def forced_bytes(self) -> bytes:
        return self._matcher.find_jump_forward_string().encode()

    def copy(self) -> XGrammarMatcher:
        return XGrammarMatcher(self._matcher.fork())


class XGrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        info = xgrammar.TokenizerInfo.from_huggingface(
            hf_tokenizer, vocab_size=vocab_size, stop_token_ids=eos_token_ids
        )
        self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)

    def compile(self, spec: GrammarSpec) -> XGrammarMatcher:
        compiler = self._compiler
        json_options: dict[str, Any] = {
            "any_whitespace": False,
            "separators": (JSON_ITEM_SEPARATOR, JSON_KEY_SEPARATOR),
            # Plain JSON Schema semantics (extra properties allowed unless forbidden), as
            # llguidance has them.
            "strict_mode": False,
        }
        try:
            if spec.kind == "json_schema":
                try:
                    schema = json.loads(spec.value)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"the JSON schema is not valid JSON: {exc}") from exc
                check_enforceable(schema)
                compiled = compiler.compile_json_schema(spec.value, **json_options)
            elif spec.kind == "json_object":
                compiled = compiler.compile_json_schema('{"type": "object"}', **json_options)
            elif spec.kind == "regex":
                compiled = compiler.compile_regex(spec.value)
            else:
                compiled = compiler.compile_lark(spec.value)
        except RuntimeError as exc:
            message = _LOG_PREFIX.sub("", str(exc).strip().splitlines()[0])
            raise ValueError(f"invalid {spec.kind.replace('_', ' ')}: {message}") from exc
        return XGrammarMatcher(xgrammar.GrammarMatcher(compiled))
