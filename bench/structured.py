"""Structured output: what grammar masks and jump-forward cost and save, in one run.

On one random-weight Llama with a real BPE tokenizer (``switchyard.demo``) and one fixed set
of prompts (sampled, seeded):

1. throughput under a JSON schema against the same requests unconstrained (output tokens per
   second of wall time), with jump-forward on (the default) and off; each unconstrained
   reference run makes every request exactly as long as its constrained twin (ignore_eos,
   max_tokens), so that both runs have the same batch sizes step by step;
2. jump-forward on against off on schema-heavy output (long keys, enums, a const);
3. the per-token mask time of llguidance and xgrammar on the same schemas, replaying the
   token sequences of (1) and (2) through fresh matchers, one row at a time.

    python bench/structured.py [--json PATH] [--requests 16] [--device cpu]

A random model's text is noise, so constrained outputs end wherever the grammar lets the
noise end; throughput is credited with each request's own output tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_service.engine import EngineConfig, LLMEngine, SamplingParams
from engine_service.engine.structured import (
    GRAMMAR_BACKENDS,
    GrammarSpec,
    StructuredOutputManager,
    allocate_bitmask,
)
from switchyard.demo import make_test_checkpoint

# A typical extraction schema: free text fields bounded, numbers, an enum, a nested array.
RECORD_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "rating": {"type": "number", "minimum": 0, "maximum": 10},
        "genre": {"enum": ["drama", "comedy", "documentary", "thriller"]},
        "cast": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "role": {"type": "string", "maxLength": 16},
                },
                "required": ["name", "role"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["title", "year", "rating", "genre", "cast"],
    "additionalProperties": False,
}

# Schema-heavy: long keys, enums and a const, so that most output bytes are forced.
HEAVY_SCHEMA = {
    "type": "object",
    "properties": {
        "customer_account_identifier": {"type": "integer", "minimum": 0, "maximum": 99999},
        "preferred_communication_channel": {
            "enum": ["electronic_mail_message", "telephone_call_in_the_evening", "postal_letter"]
        },
        "subscription_tier_description": {"const": "premium_annual_subscription_with_support"},
        "marketing_consent_was_given": {"type": "boolean"},
        "billing_address_country_code": {"enum": ["united_kingdom", "united_states", "france"]},
        "account_status_after_review": {"enum": ["active_in_good_standing", "suspended"]},
    },
    "required": [
        "customer_account_identifier",
        "preferred_communication_channel",
        "subscription_tier_description",
        "marketing_consent_was_given",
        "billing_address_country_code",
        "account_status_after_review",
    ],
    "additionalProperties": False,
}

PROMPTS = [
    "Describe the film as JSON:",
    "Extract the record from the review below.",
    "The quick brown fox jumps over the lazy dog. Summarize it in JSON.",
    "Return the customer's details:",
    "What is the capital of France? Answer as a JSON object.",
    "Write the answer:",
    "Please fill in the form for the new account.",
    "Cooking is both an art and a science. Give the facts.",
]


def run(
    engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]
) -> dict[str, Any]:
    """Run every request at once; output tokens, wall time, steps, and each token list."""
    steps_before = engine.steps_total
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    sequences = [sample for samples in outputs for sample in samples]
    num_tokens = sum(len(s) for s in sequences)
    return {
        "output_tokens": num_tokens,
        "seconds": seconds,
        "tok_s": num_tokens / seconds,
        "steps": engine.steps_total - steps_before,
        "sequences": sequences,
    }


def mask_times_us(
    manager: StructuredOutputManager, spec: GrammarSpec, sequences: list[list[int]], eos: set[int]
) -> list[float]:
    """Time one mask fill per output token, replaying each sequence through a fresh matcher."""
    bitmask = allocate_bitmask(1, manager.vocab_size, pin_memory=False)
    times: list[float] = []
    for sequence in sequences:
        matcher = manager.matcher(spec)
        for token_id in sequence:
            start = time.perf_counter()
            matcher.fill_bitmask(bitmask, 0)
            times.append((time.perf_counter() - start) * 1e6)
            if token_id in eos or not matcher.accept_token(token_id):
                break
    return times


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path, help="draw the results into this PNG")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as folder:
        path = make_test_checkpoint(Path(folder) / "model", max_position_embeddings=2048)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        prompts = [
            tokenizer.encode(PROMPTS[i % len(PROMPTS)], add_special_tokens=False)
            for i in range(args.requests)
        ]

        def params(spec: GrammarSpec | None) -> list[SamplingParams]:
            return [
                SamplingParams(temperature=1.0, seed=i, max_tokens=args.max_tokens, structured=spec)
                for i in range(args.requests)
            ]

        def free_twin(constrained: dict[str, Any]) -> list[SamplingParams]:
            return [
                SamplingParams(temperature=1.0, seed=i, max_tokens=len(tokens), ignore_eos=True)
                for i, tokens in enumerate(constrained["sequences"])
            ]

        record = GrammarSpec("json_schema", json.dumps(RECORD_SCHEMA))
        heavy = GrammarSpec("json_schema", json.dumps(HEAVY_SCHEMA))
        engines = {
            jf: LLMEngine(
                EngineConfig(
                    model=str(path), dtype="float32", device=args.device, enable_jump_forward=jf
                )
            )
            for jf in (True, False)
        }
        for engine in engines.values():  # warm-up: tokenizer, grammar compilation, kernels
            run(engine, prompts[:2], params(record)[:2])
            run(engine, prompts[:2], params(heavy)[:2])
            run(engine, prompts[:2], params(None)[:2])

        constrained = run(engines[True], prompts, params(record))
        free = run(engines[True], prompts, free_twin(constrained))
        constrained_no_jf = run(engines[False], prompts, params(record))
        free_no_jf = run(engines[False], prompts, free_twin(constrained_no_jf))
        heavy_on = run(engines[True], prompts, params(heavy))
        heavy_off = run(engines[False], prompts, params(heavy))

        eos = set(engines[True].eos_token_ids)
        manager = engines[True].structured
        masks: dict[str, dict[str, float]] = {}
        for backend in GRAMMAR_BACKENDS:
            times: list[float] = []
            for spec, result in ((record, constrained_no_jf), (heavy, heavy_off)):
                spec = GrammarSpec(spec.kind, spec.value, backend)
                manager.matcher(spec)  # compile outside the timing
                times += mask_times_us(manager, spec, result["sequences"], eos)
            masks[backend] = {
                "p50": percentile(times, 50),
                "p99": percentile(times, 99),
                "samples": len(times),
            }

    results = {
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "requests": args.requests,
        "free_tok_s": free["tok_s"],
        "free_twin_of_no_jump_forward_tok_s": free_no_jf["tok_s"],
        "constrained_tok_s": constrained["tok_s"],
        "constrained_no_jump_forward_tok_s": constrained_no_jf["tok_s"],
        "constrained_over_free_tok_s": constrained["tok_s"] / free["tok_s"],
        "constrained_no_jump_forward_over_free_tok_s": constrained_no_jf["tok_s"]
        / free_no_jf["tok_s"],
        "jump_forward_on_tok_s": heavy_on["tok_s"],
        "jump_forward_off_tok_s": heavy_off["tok_s"],
        "jump_forward_speedup": heavy_on["tok_s"] / heavy_off["tok_s"],
        "jump_forward_steps_on": heavy_on["steps"],
        "jump_forward_steps_off": heavy_off["steps"],
        "mask_us_p50": masks["llguidance"]["p50"],
        "mask_us_p99": masks["llguidance"]["p99"],
        "mask_us": masks,
    }
    rows = [
        ("json_schema (jump-forward on)", constrained),
        ("  unconstrained, same lengths", free),
        ("json_schema (jump-forward off)", constrained_no_jf),
        ("  unconstrained, same lengths", free_no_jf),
        ("schema-heavy, jump-forward on", heavy_on),
        ("schema-heavy, jump-forward off", heavy_off),
    ]
    print(f"{'run':<34}{'out tokens':>11}{'steps':>8}{'seconds':>9}{'tok/s':>9}")
    for name, r in rows:
        figures = f"{r['output_tokens']:>11}{r['steps']:>8}{r['seconds']:>9.2f}{r['tok_s']:>9.1f}"
        print(f"{name:<34}{figures}")
    print(
        f"constrained / free: {results['constrained_over_free_tok_s']:.2f}x "
        f"(jump-forward off: {results['constrained_no_jump_forward_over_free_tok_s']:.2f}x); "
        f"jump-forward speedup: {results['jump_forward_speedup']:.2f}x"
    )
    print(f"{'mask per token (µs)':<34}{'p50':>9}{'p99':>9}{'tokens':>9}")
    for backend, m in masks.items():
        print(f"{backend:<34}{m['p50']:>9.1f}{m['p99']:>9.1f}{int(m['samples']):>9}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        from plots import save, structured_figure

        save(structured_figure(results), args.plot)


if __name__ == "__main__":
    main()
