"""What a request asks the grammar backends to enforce: :class:`GrammarSpec`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GrammarKind = Literal["json_schema", "json_object", "regex", "grammar"]

GRAMMAR_KINDS: tuple[GrammarKind, ...] = ("json_schema", "json_object", "regex", "grammar")
GRAMMAR_BACKENDS = ("llguidance", "xgrammar")

# JSON is generated compactly, with Python's separators and no other whitespace: the
# whitespace a schema allows between tokens would otherwise let a model pad forever.
JSON_ITEM_SEPARATOR = ", "
JSON_KEY_SEPARATOR = ": "


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """A constraint on a request's output; the engine's twin of ``StructuredOutput``.

    ``value`` is the JSON Schema as JSON text (``json_schema``), the regular expression
    (``regex``) or the Lark grammar in llguidance's syntax (``grammar``); it is ignored for
    ``json_object`` (any JSON object). ``backend`` is ``""`` for the engine's default,
    ``"llguidance"`` or ``"xgrammar"``. Frozen and hashable: compiled grammars are cached by it.
    """

    kind: GrammarKind
    value: str = ""
    backend: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for an unknown kind or backend, or a missing value."""
        if self.kind not in GRAMMAR_KINDS:
            raise ValueError(
                f"unknown structured output kind {self.kind!r}; expected one of {GRAMMAR_KINDS}"
            )
        if self.backend and self.backend not in GRAMMAR_BACKENDS:
            raise ValueError(
                f"unknown grammar backend {self.backend!r}; expected one of {GRAMMAR_BACKENDS}"
            )
        if self.kind != "json_object" and not self.value:
            raise ValueError(f"structured output {self.kind} is empty")
