"""The grammar backend interface: compile a :class:`GrammarSpec`, then match tokens.

Two implementations: llguidance (the default) and xgrammar. Both speak the same token
bitmask, so one batch can mix them::

    bitmask: int32 [num_rows, ceil(vocab / 32)], on the host
    token t may come next in row r  <=>  bit (t % 32) of bitmask[r, t // 32] is set
    a row of -1 (all bits set) leaves its logits untouched
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from engine_service.engine.structured.spec import GrammarSpec


class GrammarMatcher(ABC):
    """One sample's position in a compiled grammar; lives on ``Request.grammar``.

    Contract:

    - ``fill_bitmask`` writes the tokens allowed next into one row of the bitmask and leaves
      the state alone. The engine calls it on a worker thread while the model runs; no other
      method of the same matcher runs meanwhile.
    - ``accept_token`` advances by one token. ``False`` means the token breaks the grammar;
      the matcher is then unusable (the sampler's mask should have made that impossible).
    - ``num_acceptable`` counts how many of the given tokens, from the first, the grammar
      would accept in a row, without changing the state.
    - ``rollback(n)`` undoes the last ``n`` accepted tokens, exactly.
    - ``is_terminated`` is true once the grammar has accepted an EOS token, or (where the
      backend can tell) once nothing but EOS may follow.
    - ``forced_bytes`` are the bytes every continuation starts with (``b""`` when the model
      has a choice); it leaves the state alone.
    - ``copy`` is an independent matcher in the same state (for the samples of ``n > 1``).

    ``backend`` names the :class:`GrammarBackend` that made it.
    """

    backend: str

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None: ...

    @abstractmethod
    def accept_token(self, token_id: int) -> bool: ...

    @abstractmethod
    def num_acceptable(self, token_ids: list[int]) -> int: ...

    @abstractmethod
    def rollback(self, num_tokens: int) -> None: ...

    @abstractmethod
    def is_terminated(self) -> bool: ...

    @abstractmethod
    def forced_bytes(self) -> bytes: ...

    @abstractmethod
    def copy(self) -> GrammarMatcher: ...


class GrammarBackend(ABC):
    """Compiles specs against one model's tokenizer.

    ``compile`` returns a matcher at the grammar's start, or raises ``ValueError`` naming
    what is wrong: a malformed schema, regex or grammar, or a keyword the backend cannot
    enforce (never a silently weaker constraint). The caller caches it and hands each sample
    a ``copy()``. ``fill_bitmasks`` fills the rows of many of its own matchers at once.
    """

    name: str

    @abstractmethod
    def compile(self, spec: GrammarSpec) -> GrammarMatcher: ...

    def fill_bitmasks(
        self, matchers: Sequence[tuple[GrammarMatcher, int]], bitmask: torch.Tensor
    ) -> None:
        for matcher, row in matchers:
            matcher.fill_bitmask(bitmask, row)
