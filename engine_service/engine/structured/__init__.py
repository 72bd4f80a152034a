"""Structured output: grammar token masks (llguidance, xgrammar) and jump-forward.

A request's :class:`GrammarSpec` (JSON Schema, any JSON object, regex, or Lark grammar)
compiles into a :class:`GrammarMatcher` that lives on the request. Each step the
:class:`StructuredOutputManager` fills the batch's token bitmask while the model runs, the
sampler applies it to the logits with :func:`apply_bitmask`, and after sampling the engine
advances the matchers and jumps over the bytes a grammar forces.
"""

from engine_service.engine.structured.backend import GrammarBackend, GrammarMatcher
from engine_service.engine.structured.bitmask import allocate_bitmask, apply_bitmask
from engine_service.engine.structured.manager import StructuredOutputManager
from engine_service.engine.structured.spec import GRAMMAR_BACKENDS, GRAMMAR_KINDS, GrammarSpec

__all__ = [
    "GRAMMAR_BACKENDS",
    "GRAMMAR_KINDS",
    "GrammarBackend",
    "GrammarMatcher",
    "GrammarSpec",
    "StructuredOutputManager",
    "allocate_bitmask",
    "apply_bitmask",
]
