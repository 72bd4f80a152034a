"""Structured output for one engine: the tokenizer, the backends, compiled grammars, masks
and jump-forward.

Nothing is loaded until the first constrained request: then the model folder's tokenizer
(``transformers.AutoTokenizer``), its llguidance view (which also re-tokenizes jump-forward
text), and the backend the request names. Compiled grammars are cached by spec (LRU) and
each sample gets a copy of the cached matcher.

Per step the engine calls :meth:`start_masks` before the forward pass; the masks are filled
on a worker thread while the model runs (torch and both backends release the GIL) and the
engine joins the returned future before sampling.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from engine_service.engine.structured.backend import GrammarBackend, GrammarMatcher
from engine_service.engine.structured.bitmask import allocate_bitmask
from engine_service.engine.structured.spec import GrammarSpec


class StructuredOutputManager:
    """Compiles specs into matchers and computes the batch's masks; engine thread only,
    except for the mask job it runs on its own worker."""

    def __init__(
        self,
        model: str,
        revision: str | None,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        default_backend: str = "llguidance",
        pin_memory: bool = False,
        cache_size: int = 256,
    ) -> None:
        self._model = model
        self._revision = revision
        self.vocab_size = vocab_size
        self._eos_token_ids = sorted(eos_token_ids)
        self.default_backend = default_backend
        self._pin_memory = pin_memory
        self._cache_size = cache_size
        self._cache: OrderedDict[GrammarSpec, GrammarMatcher] = OrderedDict()
        self._backends: dict[str, GrammarBackend] = {}
        self._hf_tokenizer: Any = None
        self._ll_tokenizer: Any = None
        self._worker: ThreadPoolExecutor | None = None

    # -- compiling ------------------------------------------------------------------------

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        """A fresh matcher for ``spec``; raises ``ValueError`` naming what is wrong with it."""
        backend = spec.backend or self.default_backend
        key = GrammarSpec(spec.kind, spec.value, backend)
        template = self._cache.get(key)
        if template is None:
            template = self._backend(backend).compile(key)
            self._cache[key] = template
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return template.copy()

    def _backend(self, name: str) -> GrammarBackend:
        backend = self._backends.get(name)
        if backend is not None:
            return backend
        self._load_tokenizer()
        if name == "llguidance":
            from engine_service.engine.structured.llguidance_backend import LLGuidanceBackend

            backend = LLGuidanceBackend(self._ll_tokenizer)
        elif name == "xgrammar":
            from engine_service.engine.structured.xgrammar_backend import XGrammarBackend

            backend = XGrammarBackend(self._hf_tokenizer, self.vocab_size, self._eos_token_ids)
        else:
            raise ValueError(f"unknown grammar backend {name!r}")
        self._backends[name] = backend
        return backend

    def _load_tokenizer(self) -> None:
        if self._ll_tokenizer is not None:
            return
        import llguidance.hf
        import transformers

        self._hf_tokenizer = transformers.AutoTokenizer.from_pretrained(
            self._model, revision=self._revision
        )
        self._ll_tokenizer = llguidance.hf.from_tokenizer(
            self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos_token_ids
        )

    # -- masks ----------------------------------------------------------------------------

    def start_masks(self, matchers: Sequence[GrammarMatcher | None]) -> Future[torch.Tensor] | None:
        """Start filling one bitmask row per entry (all-allowed where ``None``) on the worker
        thread; ``None`` when no entry is constrained. The matchers must not be touched
        until the future is done."""
        groups: dict[str, list[tuple[GrammarMatcher, int]]] = {}
        for row, matcher in enumerate(matchers):
            if matcher is not None:
                groups.setdefault(matcher.backend, []).append((matcher, row))
        if not groups:
            return None
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        bitmask = allocate_bitmask(len(matchers), self.vocab_size, self._pin_memory)
        return self._worker.submit(self._fill, groups, bitmask)

    def _fill(
        self, groups: dict[str, list[tuple[GrammarMatcher, int]]], bitmask: torch.Tensor
    ) -> torch.Tensor:
        for name, rows in groups.items():
            self._backends[name].fill_bitmasks(rows, bitmask)
        return bitmask

    # -- jump-forward ---------------------------------------------------------------------

    def jump_forward(self, matcher: GrammarMatcher, head_token: int, max_tokens: int) -> list[int]:
        """Extend a sample past the bytes its grammar forces, in tokens the model would see.

        ``head_token`` is the sample's newest token: accepted by ``matcher`` but not yet run
        through the model, so it may still be re-tokenized together with the forced bytes
        (``"`` + forced ``name": `` becomes ``"name`` ``":``...). Returns at most
        ``max_tokens`` tokens to put in its place, with ``matcher`` advanced over them, or
        ``[]`` (and ``matcher`` unchanged) when nothing is forced.

        The whole run is taken when the grammar ends with it; otherwise only the tokens that
        stay the same whatever comes next (llguidance's ``tokenize_partial``), and the rest
        of the forced bytes is left for the model, whose mask then admits only them.
        """
        forced = matcher.forced_bytes()
        if not forced or max_tokens < 1:
            return []
        tokenizer = self._ll_tokenizer
        head_bytes = tokenizer.decode_bytes([head_token])
        text = head_bytes + forced
        matcher.rollback(1)
        whole = tokenizer.tokenize_bytes(text)
        if len(whole) <= max_tokens and matcher.num_acceptable(whole) == len(whole):
            _accept_all(matcher, whole)
            if matcher.is_terminated():
                return whole
            matcher.rollback(len(whole))
        stable, _ = tokenizer.tokenize_partial(text)
        stable = stable[:max_tokens]
        gains_bytes = len(tokenizer.decode_bytes(stable)) > len(head_bytes)
        if gains_bytes and matcher.num_acceptable(stable) == len(stable):
            _accept_all(matcher, stable)
            return stable
        _accept_all(matcher, [head_token])
        return []


def _accept_all(matcher: GrammarMatcher, token_ids: list[int]) -> None:
    for token_id in token_ids:
        if not matcher.accept_token(token_id):
            raise RuntimeError(f"a grammar matcher refused token {token_id} it had validated")
