"""Sampling as tensor functions: one :class:`SamplingMetadata` per step, then :func:`sample`.

Order of operations (each only when some row asks for it): raw logprobs for reporting →
repetition, frequency and presence penalties → the structured-output grammar bitmask →
min_tokens stop-token masking → greedy argmax for greedy rows; temperature, top-k, top-p,
min-p and a draw for the others. Reported logprobs are therefore the model's own, unmasked.

The draw is an exponential race: ``argmax(p / E)`` with ``E ~ Exp(1)`` per token picks token
``i`` with probability ``p_i``. Unseeded rows take ``E`` from the engine's generator; a seeded
row draws its ``E`` from its own generator (seeded with seed + sample index), one draw per
token, so its tokens depend on its seed alone: not on the batch, the step, a preemption, or
speculative decoding (whose verification draws token ``t``'s noise for every drafted
position ``t``, :mod:`engine_service.engine.spec.verify`).

Everything below runs on the logits' device without a loop over rows; the host builds the
metadata once per step and reads back one tensor of token ids (and logprobs if asked).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch

from engine_service.engine.outputs import TokenLogprob
from engine_service.engine.request import Request
from engine_service.engine.structured import apply_bitmask


@dataclass(slots=True)
class SamplingMetadata:
    """Per-row sampling state for one step, as device tensors (``None``: nobody needs it)."""

    logits_rows: torch.Tensor | None  # which logits row each sample row reads (None: identity)
    all_greedy: bool
    greedy: torch.Tensor | None
    temperature: torch.Tensor | None
    top_k: torch.Tensor | None
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    # Penalties: output-token counts [R, V] and the rows' prompt-token mask for repetition.
    output_counts: torch.Tensor | None
    prompt_seen: torch.Tensor | None
    repetition: torch.Tensor | None
    frequency: torch.Tensor | None
    presence: torch.Tensor | None
    # (row, token) pairs that min_tokens forbids this step, and rows with a grammar.
    early_stop_rows: torch.Tensor | None
    early_stop_tokens: torch.Tensor | None
    grammar_rows: torch.Tensor | None
    grammar_bitmask: torch.Tensor | None
    # Seeded rows and their exponential noise, drawn from each sample's own generator.
    seeded_rows: torch.Tensor | None
    seeded_noise: torch.Tensor | None
    max_num_logprobs: int | None
    logprob_rows: list[int]
    logprob_index: torch.Tensor | None
    # How many alternatives each of logprob_rows asked for (the step computes the most).
    logprob_counts: list[int] | None = None

    @classmethod
    def build(
        cls,
        sample_rows: list[tuple[int, Request]],
        vocab_size: int,
        device: torch.device,
        grammar_bitmask: torch.Tensor | None = None,
        num_logits: int | None = None,
    ) -> SamplingMetadata:
        """``num_logits``: how many logits rows the step produced (default: one per sample
        row); rows are gathered unless the sample rows are exactly those, in order."""
        requests = [r for _, r in sample_rows]
        rows = [row for row, _ in sample_rows]
        params = [r.params for r in requests]
        num = len(requests)

        pin = device.type == "cuda"

        def tensor(values, dtype=torch.float32) -> torch.Tensor:
            # From pinned memory: a copy from pageable memory would wait for the stream.
            host = torch.tensor(values, dtype=dtype)
            return host.pin_memory().to(device, non_blocking=True) if pin else host

        identity = (num_logits is None or num_logits == num) and rows == list(range(num))
        greedy_list = [p.greedy for p in params]
        all_greedy = all(greedy_list)
        temperature = top_k = top_p = min_p = greedy = None
        if not all_greedy:
            greedy = tensor(greedy_list, torch.bool)
            temperature = tensor([max(p.temperature, 1e-5) for p in params])
            if any(p.top_k > 0 for p in params):
                top_k = tensor([p.top_k if p.top_k > 0 else vocab_size for p in params], torch.long)
            if any(p.top_p < 1.0 for p in params):
                top_p = tensor([p.top_p for p in params])
            if any(p.min_p > 0.0 for p in params):
                min_p = tensor([p.min_p for p in params])

        output_counts = prompt_seen = repetition = frequency = presence = None
        if any(p.needs_penalties for p in params):
            output_counts = _token_counts([r.output_token_ids for r in requests], vocab_size)
            output_counts = _pinned_to(output_counts, device)
            repetition = tensor([p.repetition_penalty for p in params])
            frequency = tensor([p.frequency_penalty for p in params])
            presence = tensor([p.presence_penalty for p in params])
            if any(p.repetition_penalty != 1.0 for p in params):
                prompts = [
                    r.prompt_token_ids if r.params.repetition_penalty != 1.0 else []
                    for r in requests
                ]
                prompt_seen = _pinned_to(_token_counts(prompts, vocab_size) > 0, device)

        stop_rows: list[int] = []
        stop_tokens: list[int] = []
        grammar_rows = [i for i, r in enumerate(requests) if r.grammar is not None]
        for i, r in enumerate(requests):
            if r.num_output_tokens + r.num_pending_tokens < r.params.min_tokens:
                stops = set(r.params.stop_token_ids)
                if not r.params.ignore_eos:
                    stops |= r.eos_token_ids
                stop_rows.extend([i] * len(stops))
                stop_tokens.extend(stops)

        seeded = [i for i, r in enumerate(requests) if draws_seeded(r)]
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        return cls(
            logits_rows=None if identity else tensor(rows, torch.long),
            all_greedy=all_greedy,
            greedy=greedy,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            output_counts=output_counts,
            prompt_seen=prompt_seen,
            repetition=repetition,
            frequency=frequency,
            presence=presence,
            early_stop_rows=tensor(stop_rows, torch.long) if stop_rows else None,
            early_stop_tokens=tensor(stop_tokens, torch.long) if stop_rows else None,
            grammar_rows=tensor(grammar_rows, torch.long) if grammar_rows else None,
            grammar_bitmask=grammar_bitmask,
            seeded_rows=tensor(seeded, torch.long) if seeded else None,
            seeded_noise=_pinned_to(
                torch.stack(
                    [
                        torch.empty(vocab_size).exponential_(generator=requests[i].generator)
                        for i in seeded
                    ]
                ),
                device,
            )
            if seeded
            else None,
            max_num_logprobs=max((params[i].logprobs for i in want), default=None),
            logprob_rows=want,
            logprob_index=tensor(want, torch.long) if want else None,
            logprob_counts=[params[i].logprobs for i in want],
        )

    def for_rows(self, index: torch.Tensor, all_greedy: bool) -> SamplingMetadata:
        """The sampling state of sample rows ``index`` (a device tensor, repeats allowed), to
        process other logits rows as those rows' own: greedy or not, temperature, top-k,
        top-p, min-p and the penalties' counts. Grammar masks, min_tokens, seeded noise and
        logprobs are left to the caller. ``all_greedy``: whether every selected row is."""

        def pick(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else values[index]

        return SamplingMetadata(
            logits_rows=None,
            all_greedy=all_greedy,
            greedy=pick(self.greedy),
            temperature=pick(self.temperature),
            top_k=pick(self.top_k),
            top_p=pick(self.top_p),
            min_p=pick(self.min_p),
            output_counts=pick(self.output_counts),
            prompt_seen=pick(self.prompt_seen),
            repetition=pick(self.repetition),
            frequency=pick(self.frequency),
            presence=pick(self.presence),
            early_stop_rows=None,
            early_stop_tokens=None,
            grammar_rows=None,
            grammar_bitmask=None,
            seeded_rows=None,
            seeded_noise=None,
            max_num_logprobs=None,
            logprob_rows=[],
            logprob_index=None,
        )


def draws_seeded(request: Request) -> bool:
    """Whether the request's draws take their noise from its own generator (one vocabulary
    row of exponentials per sampled token, in output order)."""
    return request.generator is not None and not request.params.greedy


@dataclass(slots=True)
class SamplerResult:
    """Sampled token ids on the device, and what logprob reporting needs (device too)."""

    token_ids: torch.Tensor
    chosen_logprobs: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None

    # Speculative decoding: the step's verification on the device (a
    # :class:`~engine_service.engine.spec.verify.Verification`, read back with the tokens),
    # and after :meth:`to_host` the tokens to commit per sample row that verified drafts.
    verification: Any = None
    verified: dict[int, list[int]] | None = None
    verified_logprobs: dict[int, list[TokenLogprob]] | None = None
    _host: tuple[torch.Tensor | None, ...] | None = None
    _ready: torch.cuda.Event | None = None

    def start_host_copy(self) -> None:
        """Queue the copies to the host behind the step's kernels; :meth:`to_host` then waits
        for this step alone, not for steps queued after it (overlapped scheduling)."""
        tensors = (self.token_ids, self.chosen_logprobs, self.top_logprobs, self.top_ids)
        if self.verification is not None:
            tensors += self.verification.host_tensors()
        if not self.token_ids.is_cuda:
            self._host = tensors
            return
        self._host = tuple(
            t.to("cpu", non_blocking=True) if t is not None else None for t in tensors
        )
        self._ready = torch.cuda.Event()
        self._ready.record()

    def to_host(self, meta: SamplingMetadata) -> tuple[list[int], list[TokenLogprob | None]]:
        """Token ids and per-row logprobs as Python values (the step's one sync); with a
        verification, also :attr:`verified` and :attr:`verified_logprobs`."""
        if self._host is None:
            self.start_host_copy()
        if self._ready is not None:
            self._ready.synchronize()
        token_ids, chosen_lp, top_lp, top_ids_t = self._host[:4]
        if self.verification is not None:
            self.verified, self.verified_logprobs = self.verification.read(self._host[4:])
        token_list = token_ids.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(token_list)
        if chosen_lp is not None:
            chosen = chosen_lp.tolist()
            top_vals = top_lp.tolist() if top_lp is not None else None
            top_ids = top_ids_t.tolist() if top_ids_t is not None else None
            counts = meta.logprob_counts
            for j, row in enumerate(meta.logprob_rows):
                alternatives = list(zip(top_ids[j], top_vals[j])) if top_ids else []
                if counts is not None:  # the row's own number, not the batch's largest
                    alternatives = alternatives[: counts[j]]
                logprobs[row] = TokenLogprob(token_list[row], chosen[j], alternatives)
        return token_list, logprobs


@torch.inference_mode()
def sample(
    logits: torch.Tensor, meta: SamplingMetadata, generator: torch.Generator
) -> SamplerResult:
    """``logits``: fp32 ``[num_logits_rows, vocab]``; one token per sample row."""
    if meta.logits_rows is not None:
        logits = logits[meta.logits_rows]
    raw_logprobs = None
    if meta.logprob_index is not None:
        raw_logprobs = torch.log_softmax(logits[meta.logprob_index], dim=-1)

    if meta.output_counts is not None:
        logits = apply_penalties(logits, meta)
    if meta.grammar_bitmask is not None:
        logits = apply_bitmask(logits, meta.grammar_bitmask)
    if meta.early_stop_rows is not None:
        before = logits
        minus_inf = torch.full((), float("-inf"), device=logits.device)  # no host copy
        logits = logits.index_put((meta.early_stop_rows, meta.early_stop_tokens), minus_inf)
        if meta.grammar_rows is not None:
            # A grammar that admits only stop tokens wins over min_tokens.
            is_grammar = torch.zeros(logits.shape[0], 1, dtype=torch.bool, device=logits.device)
            is_grammar[meta.grammar_rows] = True
            dead = is_grammar & ~torch.isfinite(logits).any(dim=-1, keepdim=True)
            logits = torch.where(dead, before, logits)

    token_ids = logits.argmax(dim=-1)
    if not meta.all_greedy:
        drawn = draw(logits, meta, generator)
        token_ids = torch.where(meta.greedy, token_ids, drawn)

    result = SamplerResult(token_ids)
    if raw_logprobs is not None:
        chosen_ids = token_ids[meta.logprob_index]
        result.chosen_logprobs = raw_logprobs.gather(1, chosen_ids[:, None]).squeeze(1)
        if meta.max_num_logprobs:
            top = raw_logprobs.topk(meta.max_num_logprobs, dim=-1)
            result.top_logprobs, result.top_ids = top.values, top.indices
    return result


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition (CTRL: divide positive logits, multiply negative ones, for every token
    seen in the prompt or output), then OpenAI's frequency and presence penalties."""
    counts = meta.output_counts
    assert counts is not None and meta.repetition is not None
    if meta.prompt_seen is not None:
        seen = meta.prompt_seen | (counts > 0)
        rep = meta.repetition[:, None]
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
    return (
        logits
        - meta.frequency[:, None] * counts
        - meta.presence[:, None] * (counts > 0).to(logits.dtype)
    )


def draw(logits: torch.Tensor, meta: SamplingMetadata, generator: torch.Generator) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p, then one exponential race per row."""
    return race(processed_probs(logits, meta), meta, generator)


def race(probs: torch.Tensor, meta: SamplingMetadata, generator: torch.Generator) -> torch.Tensor:
    """One token per row drawn from ``probs``: ``argmax(p / E)``, ``E ~ Exp(1)``, seeded rows
    with their own noise."""
    noise = torch.empty_like(probs)
    noise.exponential_(generator=generator)
    if meta.seeded_rows is not None:
        noise[meta.seeded_rows] = meta.seeded_noise
    return (probs / noise).argmax(dim=-1)


def processed_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """The distribution a row samples from: temperature, then top-k, top-p and min-p."""
    assert meta.temperature is not None
    logits = logits / meta.temperature[:, None]
    if meta.top_k is not None or meta.top_p is not None:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        if meta.top_k is not None:
            ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
            sorted_logits = sorted_logits.masked_fill(ranks >= meta.top_k[:, None], float("-inf"))
        if meta.top_p is not None:
            probs = sorted_logits.softmax(dim=-1)
            # Keep the smallest head whose mass reaches top_p (always the first token).
            mass_before = probs.cumsum(dim=-1) - probs
            sorted_logits = sorted_logits.masked_fill(
                mass_before >= meta.top_p[:, None], float("-inf")
            )
        logits = torch.full_like(logits, float("-inf")).scatter(1, sorted_idx, sorted_logits)
    probs = logits.softmax(dim=-1)
    if meta.min_p is not None:
        threshold = meta.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _pinned_to(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _token_counts(token_lists: list[list[int]], vocab_size: int) -> torch.Tensor:
    """``[len(token_lists), vocab]`` float counts, built with one scatter (no row loop)."""
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    flat = torch.tensor(list(chain.from_iterable(token_lists)), dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(token_lists)), lengths)
    counts = torch.zeros(len(token_lists), vocab_size)
    counts.index_put_((rows, flat), torch.ones(len(flat)), accumulate=True)
    return counts
