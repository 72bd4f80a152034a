"""The sampler: one vectorized pass over the batch's logits per step.

Order of operations (each only when some row asks for it): raw logprobs for reporting →
repetition, frequency and presence penalties → the structured-output grammar bitmask →
min_tokens stop-token masking → greedy argmax for greedy rows; temperature, top-k, top-p,
min-p and a draw for the others. Reported logprobs are therefore the model's own, unmasked.

The draw is an exponential race: ``argmax(p / E)`` with ``E ~ Exp(1)`` per token picks token
``i`` with probability ``p_i``. A seeded row draws its ``E`` from its own generator, so its
tokens depend on its seed alone, not on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_service.engine.outputs import TokenLogprob
from engine_service.engine.request import Request
from engine_service.engine.structured import apply_bitmask


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    @torch.inference_mode()
    def sample(
        self,
        logits: torch.Tensor,
        requests: list[Request],
        grammar_bitmask: torch.Tensor | None = None,
    ) -> SamplerOutput:
        """``logits``: fp32 ``[len(requests), vocab]``, one row per sequence to extend;
        ``grammar_bitmask``: the host bitmask of allowed tokens, one row per sequence."""
        num_rows, vocab = logits.shape
        params = [r.params for r in requests]
        want_logprobs = [p.logprobs is not None for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None

        if any(p.needs_penalties for p in params):
            logits = self._apply_penalties(logits.clone(), requests, vocab)
        if grammar_bitmask is not None:
            logits = apply_bitmask(logits, grammar_bitmask)
        logits = self._mask_early_stops(logits, requests)

        greedy = [p.greedy for p in params]
        token_ids = logits.argmax(dim=-1)
        if not all(greedy):
            sampled = self._draw(logits, requests)
            is_greedy = torch.tensor(greedy, device=logits.device)
            token_ids = torch.where(is_greedy, token_ids, sampled)

        token_list = token_ids.tolist()
        logprobs: list[TokenLogprob | None] = [None] * num_rows
        if raw_logprobs is not None:
            max_top = max((p.logprobs or 0) for p in params)
            chosen = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1).tolist()
            top_vals = top_ids = None
            if max_top > 0:
                top = raw_logprobs.topk(max_top, dim=-1)
                top_vals, top_ids = top.values.tolist(), top.indices.tolist()
            for row, p in enumerate(params):
                if p.logprobs is None:
                    continue
                k = p.logprobs
                alternatives = (
                    list(zip(top_ids[row][:k], top_vals[row][:k])) if k and top_ids else []
                )
                logprobs[row] = TokenLogprob(token_list[row], chosen[row], alternatives)
        return SamplerOutput(token_list, logprobs)

    def _apply_penalties(self, logits: torch.Tensor, requests: list[Request], vocab: int):
        device = logits.device
        rows = [r for r in requests]
        max_out = max(1, max(r.num_output_tokens for r in rows))
        out_ids = torch.full((len(rows), max_out), vocab, dtype=torch.long)
        for i, r in enumerate(rows):
            ids = r.output_token_ids
            if ids:
                out_ids[i, : len(ids)] = torch.tensor(ids)
        out_ids = out_ids.to(device)
        counts = torch.zeros(len(rows), vocab + 1, device=device)
        counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=counts.dtype))
        counts = counts[:, :vocab]

        rep = torch.tensor([r.params.repetition_penalty for r in rows], device=device)[:, None]
        if (rep != 1.0).any():
            seen = counts > 0
            for i, r in enumerate(rows):
                if r.params.repetition_penalty != 1.0:
                    seen[i, torch.tensor(r.prompt_token_ids, device=device)] = True
            penalised = torch.where(logits > 0, logits / rep, logits * rep)
            logits = torch.where(seen, penalised, logits)
        freq = torch.tensor([r.params.frequency_penalty for r in rows], device=device)[:, None]
        pres = torch.tensor([r.params.presence_penalty for r in rows], device=device)[:, None]
        return logits - freq * counts - pres * (counts > 0).to(logits.dtype)

    def _mask_early_stops(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Before min_tokens are out, EOS and stop tokens cannot be chosen, unless a grammar
        admits nothing else."""
        masked = False
        for row, r in enumerate(requests):
            if r.num_output_tokens < r.params.min_tokens:
                stops = set(r.params.stop_token_ids)
                if not r.params.ignore_eos:
                    stops |= r.eos_token_ids
                if stops:
                    if not masked:
                        logits, masked = logits.clone(), True
                    unmasked = logits[row].clone() if r.grammar is not None else None
                    logits[row, list(stops)] = float("-inf")
                    if unmasked is not None and not torch.isfinite(logits[row]).any():
                        logits[row] = unmasked
        return logits

    def _draw(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        device = logits.device
        params = [r.params for r in requests]
        temps = torch.tensor([max(p.temperature, 1e-5) for p in params], device=device)
        logits = logits / temps[:, None]

        top_k = [p.top_k if p.top_k > 0 else 0 for p in params]
        top_p = [p.top_p for p in params]
        if any(top_k) or any(p < 1.0 for p in top_p):
            sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
            vocab = logits.shape[-1]
            ranks = torch.arange(vocab, device=device)[None, :]
            k = torch.tensor([k or vocab for k in top_k], device=device)[:, None]
            drop = ranks >= k
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            probs = sorted_logits.softmax(dim=-1)
            # Keep the smallest head whose mass reaches top_p (always the first token).
            mass_before = probs.cumsum(dim=-1) - probs
            p = torch.tensor(top_p, device=device)[:, None]
            sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(1, sorted_idx, sorted_logits)

        probs = logits.softmax(dim=-1)
        min_p = [p.min_p for p in params]
        if any(min_p):
            threshold = (
                torch.tensor(min_p, device=device)[:, None] * probs.max(-1, keepdim=True).values
            )
            probs = probs.masked_fill(probs < threshold, 0.0)

        noise = torch.empty_like(probs)
        noise.exponential_(generator=self.generator)
        for row, r in enumerate(requests):
            if r.generator is not None:
                row_noise = torch.empty(probs.shape[1]).exponential_(generator=r.generator)
                noise[row] = row_noise.to(device)
        return (probs / noise).argmax(dim=-1)
