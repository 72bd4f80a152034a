"""Structured output in the engine core, on a random-weight model with a real BPE tokenizer.

The model is an adversarial generator: its sampled text is noise, so every valid output
below is the grammar mask's doing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
import transformers

from engine_service.engine import EngineConfig, LLMEngine, RequestOutput, SamplingParams
from engine_service.engine.batch import ScheduledBatch, ScheduledSequence
from engine_service.engine.request import Request
from engine_service.engine.spec.grammar import draft_grammar_masks
from engine_service.engine.structured import GrammarSpec, StructuredOutputManager
from switchyard.demo import make_test_checkpoint

BACKENDS = ["llguidance", "xgrammar"]

# Every string, array and number below is bounded, so a valid output must end: the
# adversarial model can only finish with "stop".
SCHEMAS: dict[str, dict[str, Any]] = {
    "flat_object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "active": {"type": "boolean"},
        },
        "required": ["name", "age", "active"],
        "additionalProperties": False,
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 9999},
                    "email": {"type": "string", "maxLength": 12},
                },
                "required": ["id", "email"],
                "additionalProperties": False,
            },
            "ok": {"type": "boolean"},
        },
        "required": ["user", "ok"],
        "additionalProperties": False,
    },
    "bounded_array": {
        "type": "array",
        "items": {"type": "integer", "minimum": -5, "maximum": 5},
        "minItems": 2,
        "maxItems": 4,
    },
    "enum_and_const": {
        "type": "object",
        "properties": {
            "kind": {"const": "event"},
            "level": {"enum": ["debug", "info", "warning", "error"]},
            "tags": {
                "type": "array",
                "items": {"enum": ["a", "b", "c"]},
                "minItems": 1,
                "maxItems": 3,
            },
        },
        "required": ["kind", "level", "tags"],
        "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {
            "value": {
                "anyOf": [
                    {"type": "integer", "minimum": 0, "maximum": 9},
                    {"type": "string", "maxLength": 3},
                    {"type": "null"},
                ]
            }
        },
        "required": ["value"],
        "additionalProperties": False,
    },
    "ref_and_defs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": 0, "maximum": 99},
                    "y": {"type": "integer", "minimum": 0, "maximum": 99},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
    "integer_bounds": {
        "type": "object",
        "properties": {
            "small": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20},
            "negative": {"type": "integer", "minimum": -300, "maximum": -200},
        },
        "required": ["small", "negative"],
        "additionalProperties": False,
    },
    "string_bounds_and_pattern": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
            "word": {"type": "string", "minLength": 2, "maxLength": 4},
        },
        "required": ["code", "word"],
        "additionalProperties": False,
    },
}

# Long keys and enums: most of the output is forced, which jump-forward skips over.
SCHEMA_HEAVY = {
    "type": "object",
    "properties": {
        "customer_identification_number": {"type": "integer", "minimum": 0, "maximum": 999},
        "preferred_communication_channel": {"enum": ["electronic_mail", "telephone_call"]},
        "subscription_tier_description": {"const": "premium_annual_subscription"},
    },
    "required": [
        "customer_identification_number",
        "preferred_communication_channel",
        "subscription_tier_description",
    ],
    "additionalProperties": False,
}

REGEXES = [r"\d{3}-\d{4}", r"(yes|no|maybe)", r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_checkpoint(
        tmp_path_factory.mktemp("structured") / "tiny-llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=1024,
    )


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(checkpoint)


def make_engine(checkpoint: Path, **settings: Any) -> LLMEngine:
    config = {"num_kv_blocks": 512, "block_size": 16, **settings}
    return LLMEngine(EngineConfig(model=str(checkpoint), dtype="float32", **config))


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> LLMEngine:
    """One engine for the tests that read only their own requests' outputs."""
    return make_engine(checkpoint)


def run(engine: LLMEngine) -> dict[tuple[str, int], list[RequestOutput]]:
    outputs: dict[tuple[str, int], list[RequestOutput]] = {}
    while engine.has_unfinished():
        for output in engine.step():
            outputs.setdefault((output.request_id, output.index), []).append(output)
    return outputs


def text_of(tokenizer: Any, outputs: list[RequestOutput]) -> str:
    ids = [t for output in outputs for t in output.new_token_ids]
    return tokenizer.decode(ids, skip_special_tokens=True)


def prompt(tokenizer: Any, text: str = "Write the answer as JSON:") -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def sampled(spec: GrammarSpec, seed: int, **fields: Any) -> SamplingParams:
    fields = {"temperature": 1.0, "max_tokens": 300, **fields}
    return SamplingParams(seed=seed, structured=spec, **fields)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_json_schema_output_validates_and_stops(
    engine: LLMEngine, tokenizer: Any, backend: str
) -> None:
    for name, schema in SCHEMAS.items():
        spec = GrammarSpec("json_schema", json.dumps(schema), backend)
        for seed in range(2):
            engine.add_request(f"{name}-{seed}", prompt(tokenizer), sampled(spec, seed))
    outputs = run(engine)
    for name, schema in SCHEMAS.items():
        for seed in range(2):
            sample = outputs[(f"{name}-{seed}", 0)]
            text = text_of(tokenizer, sample)
            assert sample[-1].finish_reason == "stop", (name, text)
            jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("backend", BACKENDS)
def test_json_object_outputs_are_objects(engine: LLMEngine, tokenizer: Any, backend: str) -> None:
    # Unbounded, but these seeds close their objects well within max_tokens.
    spec = GrammarSpec("json_object", backend=backend)
    for seed in range(3):
        engine.add_request(f"object-{seed}", prompt(tokenizer), sampled(spec, seed))
    outputs = run(engine)
    for seed in range(3):
        sample = outputs[(f"object-{seed}", 0)]
        assert sample[-1].finish_reason == "stop"
        assert isinstance(json.loads(text_of(tokenizer, sample)), dict)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regex_outputs_fullmatch(engine: LLMEngine, tokenizer: Any, backend: str) -> None:
    for i, pattern in enumerate(REGEXES):
        spec = GrammarSpec("regex", pattern, backend)
        engine.add_request(f"regex-{i}", prompt(tokenizer, "Answer:"), sampled(spec, seed=i))
    outputs = run(engine)
    for i, pattern in enumerate(REGEXES):
        sample = outputs[(f"regex-{i}", 0)]
        assert sample[-1].finish_reason == "stop"
        assert re.fullmatch(pattern, text_of(tokenizer, sample)), pattern


@pytest.mark.parametrize("backend", BACKENDS)
def test_lark_grammar_output_is_in_the_language(
    engine: LLMEngine, tokenizer: Any, backend: str
) -> None:
    grammar = 'start: "say " word ("," word)?\nword: "hi" | "bye" | "maybe"'
    spec = GrammarSpec("grammar", grammar, backend)
    engine.add_request("lark", prompt(tokenizer, "Say:"), sampled(spec, seed=0))
    sample = run(engine)[("lark", 0)]
    assert sample[-1].finish_reason == "stop"
    assert re.fullmatch(r"say (hi|bye|maybe)(,(hi|bye|maybe))?", text_of(tokenizer, sample))


@pytest.mark.parametrize("backend", BACKENDS)
def test_jump_forward_takes_fewer_steps_and_both_modes_stay_valid(
    checkpoint: Path, tokenizer: Any, backend: str
) -> None:
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA_HEAVY), backend)
    steps = {}
    for jump_forward in (True, False):
        engine = make_engine(checkpoint, enable_jump_forward=jump_forward)
        engine.add_request("heavy", prompt(tokenizer), sampled(spec, seed=0))
        sample = run(engine)[("heavy", 0)]
        assert sample[-1].finish_reason == "stop"
        jsonschema.validate(json.loads(text_of(tokenizer, sample)), SCHEMA_HEAVY)
        stats = engine.stats()
        assert (stats.jump_forward_tokens > 0) == jump_forward
        steps[jump_forward] = stats.steps_total
    assert steps[True] * 3 <= steps[False], steps


@pytest.mark.parametrize(
    ("backend", "spec", "problem"),
    [
        ("llguidance", GrammarSpec("json_schema", '{"type": "object",'), "not valid JSON"),
        ("xgrammar", GrammarSpec("json_schema", '{"type": "object",'), "not valid JSON"),
        ("llguidance", GrammarSpec("json_schema", '{"type": "thing"}'), "thing"),
        ("xgrammar", GrammarSpec("json_schema", '{"type": "thing"}'), "thing"),
        ("llguidance", GrammarSpec("json_schema", '{"uniqueItems": true}'), "uniqueItems"),
        ("xgrammar", GrammarSpec("json_schema", '{"uniqueItems": true}'), "uniqueItems"),
        ("xgrammar", GrammarSpec("json_schema", '{"multipleOf": 3}'), "multipleOf"),
        ("llguidance", GrammarSpec("regex", "[a-z]+("), "regex"),
        ("xgrammar", GrammarSpec("regex", "[a-z]+("), "regex"),
        ("llguidance", GrammarSpec("grammar", "start: foo\nfoo: 'a' | "), "grammar"),
        ("xgrammar", GrammarSpec("grammar", "start: foo\nfoo: 'a' | "), "grammar"),
    ],
)
def test_invalid_constraint_is_rejected_at_add_request(
    engine: LLMEngine, tokenizer: Any, backend: str, spec: GrammarSpec, problem: str
) -> None:
    spec = GrammarSpec(spec.kind, spec.value, backend)
    with pytest.raises(ValueError, match=re.escape(problem)):
        engine.add_request("bad", prompt(tokenizer), sampled(spec, seed=0))
    assert not engine.has_unfinished()


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown grammar backend"):
        GrammarSpec("regex", "a+", backend="outlines")


@pytest.mark.parametrize("backend", BACKENDS)
def test_n_samples_each_follow_the_grammar(engine: LLMEngine, tokenizer: Any, backend: str) -> None:
    schema = SCHEMAS["enum_and_const"]
    spec = GrammarSpec("json_schema", json.dumps(schema), backend)
    engine.add_request("forks", prompt(tokenizer), sampled(spec, seed=5, n=3))
    outputs = run(engine)
    texts = [text_of(tokenizer, outputs[("forks", i)]) for i in range(3)]
    for i, text in enumerate(texts):
        assert outputs[("forks", i)][-1].finish_reason == "stop"
        jsonschema.validate(json.loads(text), schema)
    # Each sample advanced its own matcher: they took different paths and all stayed valid.
    assert len(set(texts)) > 1


def test_constrained_and_free_requests_share_a_batch(
    checkpoint: Path, engine: LLMEngine, tokenizer: Any
) -> None:
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    words = prompt(tokenizer, "The weather today")
    engine.add_request("alone", words, free)
    alone = run(engine)[("alone", 0)]

    spec = GrammarSpec("json_schema", json.dumps(SCHEMAS["flat_object"]))
    engine.add_request("constrained", prompt(tokenizer), sampled(spec, seed=1))
    engine.add_request("free", words, free)
    outputs = run(engine)
    assert text_of(tokenizer, outputs[("free", 0)]) == text_of(tokenizer, alone)
    jsonschema.validate(
        json.loads(text_of(tokenizer, outputs[("constrained", 0)])), SCHEMAS["flat_object"]
    )


def test_reported_logprobs_are_the_models_not_the_masked_ones(
    engine: LLMEngine, tokenizer: Any
) -> None:
    words = prompt(tokenizer, "Numbers:")
    engine.add_request("free", words, SamplingParams(temperature=0.0, max_tokens=1, logprobs=5))
    free = run(engine)[("free", 0)][0].new_logprobs
    spec = GrammarSpec("regex", "[0-9]{4}")
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=5, structured=spec)
    engine.add_request("masked", words, params)
    masked = run(engine)[("masked", 0)]
    first = masked[0].new_logprobs
    assert free is not None and first is not None
    # The same raw distribution at the first position, whatever the mask then allowed.
    assert [t for t, _ in first[0].top] == [t for t, _ in free[0].top]
    assert re.fullmatch("[0-9]{4}", text_of(tokenizer, masked))


@pytest.mark.parametrize("backend", BACKENDS)
def test_grammar_end_outranks_min_tokens(engine: LLMEngine, tokenizer: Any, backend: str) -> None:
    spec = GrammarSpec("regex", "(yes|no)", backend)
    engine.add_request("short", prompt(tokenizer), sampled(spec, seed=0, min_tokens=20))
    sample = run(engine)[("short", 0)]
    assert sample[-1].finish_reason == "stop"
    assert text_of(tokenizer, sample) in ("yes", "no")


@pytest.mark.parametrize("backend", BACKENDS)
def test_matcher_rollback_restores_mask_and_forced_bytes(
    checkpoint: Path, engine: LLMEngine, tokenizer: Any, backend: str
) -> None:
    manager = StructuredOutputManager(
        str(checkpoint), None, engine.model_config.vocab_size, engine.eos_token_ids
    )
    matcher = manager.matcher(GrammarSpec("json_schema", json.dumps(SCHEMA_HEAVY), backend))
    head = tokenizer.encode('{"customer_identification_number": ', add_special_tokens=False)
    tail = tokenizer.encode('42, "preferred_', add_special_tokens=False)
    assert all(matcher.accept_token(t) for t in head)

    def snapshot() -> tuple[torch.Tensor, bytes]:
        bitmask = torch.full((1, (manager.vocab_size + 31) // 32), -1, dtype=torch.int32)
        matcher.fill_bitmask(bitmask, 0)
        return bitmask, matcher.forced_bytes()

    before = snapshot()
    assert all(matcher.accept_token(t) for t in tail)
    assert snapshot()[1] != before[1]
    matcher.rollback(len(tail))
    after = snapshot()
    assert torch.equal(after[0], before[0]) and after[1] == before[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_draft_tree_gets_a_mask_per_node_and_loses_what_the_grammar_forbids(
    checkpoint: Path, engine: LLMEngine, tokenizer: Any, backend: str
) -> None:
    """The matcher walks a draft tree depth first: every kept node's mask is the grammar's
    after the drafts on its path, drafts the mask at their parent forbids go with their
    subtrees, nothing hangs under a node that completes the grammar, and the matcher ends
    where it started."""
    manager = StructuredOutputManager(
        str(checkpoint), None, engine.model_config.vocab_size, engine.eos_token_ids
    )
    grammar = GrammarSpec("regex", "[ab][cd][ef]", backend)
    a, b, c, e, x = (tokenizer.convert_tokens_to_ids(ch) for ch in "abcex")
    #   0 ─ 1:x ─ 2:c           x is forbidden at the root: 1 and 2 go
    #     ├ 3:a ─ 4:c ─ 6:e ─ 7:a  "ace" completes the grammar: 7 goes
    #     │     └ 5:e           e is forbidden after "a": 5 goes
    #     └ 8:b
    parents = [0, 1, 0, 3, 3, 4, 6, 0]
    tokens = [x, c, a, c, e, e, a, b]
    request = make_request_with_grammar(manager.matcher(grammar))
    batch = ScheduledBatch()
    batch.sequences.append(
        ScheduledSequence(request, 4, 1, 1, draft_room=len(tokens), draft_token_ids=[])
    )
    batch.sample_rows.append((0, request))
    batch.sample_seqs.append(0)
    batch.place_drafts({0: tokens}, {0: parents})
    words = (manager.vocab_size + 31) // 32

    masks = draft_grammar_masks(batch, manager.vocab_size)

    seq = batch.sequences[0]
    assert seq.draft_token_ids == [a, c, e, b]
    assert seq.draft_parents == [0, 1, 2, 0]
    assert seq.num_logits == 5 and masks[0].shape == (5, words)
    for row, path in [(0, []), (1, [a]), (2, [a, c]), (4, [b])]:
        fresh = manager.matcher(grammar)
        assert all(fresh.accept_token(t) for t in path)
        expected = torch.full((1, words), -1, dtype=torch.int32)
        fresh.fill_bitmask(expected, 0)
        assert torch.equal(masks[0][row], expected[0]), path
    again = torch.full((1, words), -1, dtype=torch.int32)
    request.grammar.fill_bitmask(again, 0)
    assert torch.equal(again[0], masks[0][0])  # the matcher is back at the root


def make_request_with_grammar(matcher: Any) -> Request:
    request = Request("r", [1, 2, 3, 4, 5], SamplingParams(max_tokens=8), frozenset({0}))
    request.grammar = matcher
    return request


@pytest.mark.parametrize(
    ("tree", "backend"),
    [(False, "llguidance"), (True, "llguidance"), (True, "xgrammar")],
    ids=["chain", "tree-llguidance", "tree-xgrammar"],
)
@pytest.mark.parametrize("jump_forward", [True, False])
def test_constrained_samples_speculate_with_a_mask_per_drafted_position(
    checkpoint: Path, tokenizer: Any, jump_forward: bool, tree: bool, backend: str
) -> None:
    """Each drafted node is verified under the grammar's mask after the drafts on its path
    (the matcher walks the tree depth first, rolling back): greedy constrained outputs, and
    seeded sampled ones, equal those without speculation and validate, and unconstrained
    samples in the same steps speculate beside them."""
    # The target as its own draft proposes its unconstrained argmax (and, in a tree, its
    # next likeliest tokens): where the grammar allows them the drafts are accepted, where
    # it does not they are dropped with what hangs under them.
    spec: dict[str, Any] = {"model": str(checkpoint), "num_speculative_tokens": 3}
    if tree:
        spec["tree"] = {"topk": 3, "num_draft_tokens": 9}
    settings = {"enable_jump_forward": jump_forward}
    engine = make_engine(checkpoint, speculative_config=json.dumps(spec), **settings)
    plain = make_engine(checkpoint, **settings)
    schema = SCHEMAS[next(iter(SCHEMAS))]
    grammar = GrammarSpec("json_schema", json.dumps(schema), backend)
    greedy_params = SamplingParams(temperature=0.0, max_tokens=200, structured=grammar)
    repeating = prompt(tokenizer, "one two three one two three one two three one two")
    free = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)

    def add_all(target: LLMEngine) -> None:
        target.add_request("greedy-schema", prompt(tokenizer), greedy_params)
        for seed in range(2):
            target.add_request(f"schema-{seed}", prompt(tokenizer), sampled(grammar, seed))
        target.add_request("free", repeating, free)

    add_all(engine)
    outputs = run(engine)
    add_all(plain)
    expected = run(plain)

    for name in ("greedy-schema", "schema-0", "schema-1"):
        sample = outputs[(name, 0)]
        assert sample[-1].finish_reason == "stop"
        jsonschema.validate(json.loads(text_of(tokenizer, sample)), schema)
    tokens = {key: [t for o in outs for t in o.new_token_ids] for key, outs in outputs.items()}
    assert tokens == {
        key: [t for o in outs for t in o.new_token_ids] for key, outs in expected.items()
    }
    assert engine.scheduler.num_drafts > 0

    # Constrained samples alone: their own drafts were verified and some accepted.
    alone = make_engine(checkpoint, speculative_config=json.dumps(spec), **settings)
    greedy_tokens = tokens[("greedy-schema", 0)]
    assert alone.generate([prompt(tokenizer)], greedy_params)[0][0] == greedy_tokens
    assert alone.scheduler.accepted_draft_tokens > 0
