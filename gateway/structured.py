"""Output constraints as the engine takes them (``StructuredOutput``), checked before routing.

Every API family turns its own fields (OpenAI's ``response_format``, vLLM's
``structured_outputs`` and ``guided_*`` keys, a forced tool call) into one
``StructuredOutput``. :func:`check_constraint` compiles it with llguidance, the engine's
default grammar backend, without a tokenizer: an invalid JSON Schema, regex or grammar, or a
schema keyword the backend cannot enforce, is refused with the compiler's own message before
any replica is asked. The engine checks again (against the model's vocabulary, and for the
xgrammar backend), and its INVALID_ARGUMENT is answered 400 as well.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import llguidance

from switchyard.v1 import common_pb2

BACKENDS = ("", "llguidance", "xgrammar")

T = TypeVar("T")

# Compiling a grammar takes from microseconds to seconds (a large schema); it runs here, so
# the event loop keeps serving other requests meanwhile.
_CHECKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-check")


async def off_the_loop(check: Callable[..., T], *args: Any) -> T:
    """Runs ``check(*args)`` (a grammar check) on the checker thread and returns its result
    or raises its error."""
    return await asyncio.get_running_loop().run_in_executor(_CHECKER, check, *args)


class ConstraintError(ValueError):
    """A constraint that cannot be enforced; ``param`` names the request field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def make_constraint(
    *,
    json_schema: dict[str, Any] | str | None = None,
    json_object: bool = False,
    regex: str | None = None,
    grammar: str | None = None,
    backend: str = "",
    param: str | None = None,
) -> common_pb2.StructuredOutput | None:
    """The constraint for at most one of the kinds given; None when none is.

    Raises ``ConstraintError`` when several are given, or the backend is unknown.
    """
    given = [
        kind
        for kind, value in (
            ("json", json_schema),
            ("json_object", json_object or None),
            ("regex", regex),
            ("grammar", grammar),
        )
        if value is not None
    ]
    if not given:
        return None
    if len(given) > 1:
        raise ConstraintError(
            f"give at most one output constraint, got {', '.join(given)}", param=param
        )
    if backend not in BACKENDS:
        raise ConstraintError(
            f"unknown structured output backend {backend!r}; use llguidance or xgrammar",
            param=param,
        )
    constraint = common_pb2.StructuredOutput(backend=backend)
    if json_schema is not None:
        constraint.json_schema = (
            json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
        )
    elif json_object:
        constraint.json_object = True
    elif regex is not None:
        constraint.regex = regex
    elif grammar is not None:
        constraint.grammar = grammar
    return constraint


def check_constraint(constraint: common_pb2.StructuredOutput, param: str | None = None) -> None:
    """Raises ``ConstraintError`` naming the problem when the constraint does not compile."""
    kind = constraint.WhichOneof("kind")
    if kind == "json_schema":
        try:
            schema = json.loads(constraint.json_schema)
        except json.JSONDecodeError as exc:
            raise ConstraintError(f"the JSON schema is not valid JSON: {exc}", param) from None
        if not isinstance(schema, dict | bool):
            raise ConstraintError("the JSON schema must be an object", param)
        grammar = llguidance.grammar_from("json_schema", constraint.json_schema)
        what = "JSON schema"
    elif kind == "regex":
        grammar = llguidance.grammar_from("regex", constraint.regex)
        what = "regex"
    elif kind == "grammar":
        grammar = llguidance.grammar_from("lark", constraint.grammar)
        what = "grammar"
    else:
        return
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise ConstraintError(f"invalid {what}: {problem.strip()}", param)
