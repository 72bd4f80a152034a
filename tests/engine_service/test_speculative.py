"""Speculative decoding on tiny random Llamas: lossless outputs, rejection sampling, opt-outs.

Random weights make acceptance rates meaningless, so these tests check what must hold at any
acceptance rate: greedy outputs equal the non-speculative ones token for token (n-gram lookup
and a draft model, with prefix hits, chunked prefill and preemption), sampled tokens follow
the target's distribution, and requests speculation cannot serve exactly are served without
it.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from engine_service.engine import SamplingParams
from engine_service.engine.batch import ScheduledBatch, ScheduledSequence
from engine_service.engine.sampler import SamplingMetadata
from engine_service.engine.spec.config import SpeculativeConfig
from engine_service.engine.spec.proposers import NgramProposer
from engine_service.engine.spec.verify import verify
from tests.engine_service.helpers import (
    VOCAB,
    assert_pool_entirely_free,
    greedy,
    make_engine,
    make_llama_checkpoint,
    make_request,
)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec-target")
    make_llama_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec-draft")
    make_llama_checkpoint(path, seed=99)
    return path


def repetitive_prompts(rng: random.Random) -> list[list[int]]:
    """Prompts that repeat spans (so the n-gram proposer has something to look up) next to
    plain random ones, of mixed lengths."""
    prompts = []
    for length in (6, 13, 30, 9, 41):
        motif = [rng.randrange(3, VOCAB) for _ in range(5)]
        prompts.append((motif * (length // 5 + 1))[:length])
    prompts += [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (4, 17)]
    return prompts


def run(engine, prompts, max_tokens=24):
    outputs = engine.generate(prompts, greedy(max_tokens, ignore_eos=True))
    return [samples[0] for samples in outputs]


SPEC_CASES = {
    "ngram": lambda _: {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3},
    "draft_same": lambda paths: {"model": str(paths[0]), "num_speculative_tokens": 3},
    "draft_other": lambda paths: {
        "method": "draft_model",
        "model": str(paths[1]),
        "num_speculative_tokens": 2,
    },
    # Token trees: the target as its own draft (its argmax is always the first branch), and
    # another model, whose accepted paths often run through later branches.
    "tree_same": lambda paths: {
        "model": str(paths[0]),
        "num_speculative_tokens": 3,
        "tree": {"topk": 2, "num_draft_tokens": 6},
    },
    "tree_other": lambda paths: {
        "model": str(paths[1]),
        "num_speculative_tokens": 3,
        "tree": {"topk": 3, "num_draft_tokens": 9},
    },
}


@pytest.mark.parametrize("case", sorted(SPEC_CASES))
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"max_num_batched_tokens": 16},  # prompts chunked beside verifying sequences
        {"num_kv_blocks": 20},  # preemption while drafting
    ],
    ids=["plain", "chunked", "tight-pool"],
)
def test_greedy_speculation_equals_plain_decoding(target, other_draft, case, settings):
    prompts = repetitive_prompts(random.Random(1))
    # Shared first blocks so later prompts start from prefix-cache hits.
    prompts += [[*prompts[2][:16], 7, 8, 9], [*prompts[2][:16], 10, 11]]
    spec = json.dumps(SPEC_CASES[case]((target, other_draft)))
    plain = make_engine(target, **settings)
    speculative = make_engine(target, speculative_config=spec, **settings)

    expected = run(plain, prompts)
    got = run(speculative, prompts)

    assert got == expected
    assert speculative.scheduler.num_drafts > 0
    if case == "draft_same":
        # The draft is the target itself: every draft agrees with it.
        assert speculative.scheduler.accepted_draft_tokens == speculative.scheduler.draft_tokens
    if case == "ngram":
        assert speculative.scheduler.accepted_draft_tokens > 0
    assert_pool_entirely_free(speculative.kv_manager)


def test_rejection_sampling_draws_from_the_targets_distribution():
    """Many sequences verify one draft each against the same target distribution: the first
    committed token must follow that distribution whatever the draft was."""
    vocab = 6
    target_probs = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.15, 0.05])
    logits = target_probs.log()
    num = 6000
    batch = ScheduledBatch()
    drafts = [i % vocab for i in range(num)]  # drafts of every kind, likely and unlikely
    for i, draft in enumerate(drafts):
        request = make_request(f"r{i}", [1, 2, 3])
        request.params = SamplingParams(temperature=1.0, max_tokens=4)
        batch.sequences.append(
            ScheduledSequence(request, 3, 2, num_logits=2, draft_token_ids=[draft])
        )
        batch.sample_rows.append((2 * i, request))
        batch.sample_seqs.append(i)
    batch.num_logits = 2 * num
    generator = torch.Generator().manual_seed(0)

    meta = SamplingMetadata.build(batch.sample_rows, vocab, torch.device("cpu"), num_logits=2 * num)
    committed = verify(logits.repeat(2 * num, 1), batch, meta, generator)

    first = torch.tensor([committed[i][0] for i in range(num)])
    observed = torch.bincount(first, minlength=vocab).float() / num
    # Six thousand draws: each frequency within about four standard errors.
    assert torch.allclose(observed, target_probs, atol=0.025), observed
    # Accepted drafts carry on with a bonus token; rejected ones stop at the replacement.
    lengths = {len(committed[i]) for i in range(num)}
    assert lengths == {1, 2}


def test_greedy_verification_accepts_exactly_the_agreeing_prefix():
    logits = torch.full((4, 8), -5.0)
    for row, best in enumerate([3, 5, 1, 6]):
        logits[row, best] = 5.0
    request = make_request("r", [1, 2])
    request.params = greedy(8)
    batch = ScheduledBatch()
    batch.sequences.append(ScheduledSequence(request, 2, 4, 4, draft_token_ids=[3, 5, 2]))
    batch.sample_rows.append((0, request))
    batch.sample_seqs.append(0)
    batch.num_logits = 4

    meta = SamplingMetadata.build(batch.sample_rows, 8, torch.device("cpu"), num_logits=4)
    committed = verify(logits, batch, meta, torch.Generator())

    assert committed == {0: [3, 5, 1]}  # two drafts agreed, the third was replaced


def test_ngram_lookup_takes_the_longest_most_recent_match():
    proposer = NgramProposer(num_tokens=3, lookup_min=1, lookup_max=3)
    assert proposer.lookup([1, 2, 3, 4, 9, 2, 3, 4, 7, 2, 3], 3) == [4, 7, 2]
    assert proposer.lookup([5, 6, 7], 3) == []
    assert proposer.lookup([1, 2, 1], 2) == [2, 1]


PENALTIES = {
    "frequency": {"frequency_penalty": 0.4},
    "presence": {"presence_penalty": 0.5},
    "repetition": {"repetition_penalty": 1.15},
}


@pytest.mark.parametrize("penalty", sorted(PENALTIES))
@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree-config"])
def test_penalised_requests_speculate_and_equal_plain_decoding(target, penalty, tree):
    """Each verified node counts the drafts on its path, as plain decoding counts the tokens
    it has emitted: greedy outputs with penalties equal plain decoding's (and differ from
    unpenalised ones), with drafts accepted and rejected (the draft is the target without
    penalties). With a tree configured, penalised samples verify trees, and the accepted
    paths often run through a later branch: where the penalty moves the target off the
    draft's first choice, it is often the draft's second."""
    spec = {"model": str(target), "num_speculative_tokens": 4}
    if tree:
        spec["tree"] = {"topk": 3, "num_draft_tokens": 9}
    speculative = make_engine(target, speculative_config=json.dumps(spec))
    prompts = repetitive_prompts(random.Random(4))
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, **PENALTIES[penalty])

    got = [samples[0] for samples in speculative.generate(prompts, params)]

    plain = make_engine(target)
    expected = [samples[0] for samples in plain.generate(prompts, params)]
    unpenalised = run(plain, prompts, max_tokens=32)
    assert got == expected
    assert got != unpenalised
    scheduler = speculative.scheduler
    assert 0 < scheduler.accepted_draft_tokens < scheduler.draft_tokens
    assert (scheduler.tree_tokens_moved > 0) == tree
    assert_pool_entirely_free(speculative.kv_manager)


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_counting_the_drafts_matters_for_penalised_verification(target, monkeypatch, tree):
    """Without adding the drafts on each node's path to its counts, a penalised request's
    output differs from plain decoding: the test above checks the counting, not luck."""
    import engine_service.engine.spec.verify as verify_module

    # The request's own counts only, the path's drafts left out.
    monkeypatch.setattr(verify_module, "add_path_counts", lambda counts, trees: None)
    spec = {"model": str(target), "num_speculative_tokens": 4}
    if tree:
        spec["tree"] = {"topk": 3, "num_draft_tokens": 9}
    spec = json.dumps(spec)
    prompts = repetitive_prompts(random.Random(4))
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, presence_penalty=1.0)
    got = make_engine(target, speculative_config=spec).generate(prompts, params)
    assert got != make_engine(target).generate(prompts, params)


def test_seeded_sampling_with_speculation_is_reproducible(target):
    spec = json.dumps({"method": "ngram", "num_speculative_tokens": 3})
    prompt = [5, 6, 7, 5, 6, 7, 5, 6, 7, 5]
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=16, ignore_eos=True)
    first = make_engine(target, speculative_config=spec).generate([prompt], params)
    second = make_engine(target, speculative_config=spec).generate([prompt], params)
    assert first == second


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"method": "medusa", "num_speculative_tokens": 2}', "unknown speculative method"),
        ('{"method": "draft_model", "num_speculative_tokens": 2}', "needs .model."),
        ('{"method": "ngram"}', "num_speculative_tokens"),
        ('{"method": "eagle", "num_speculative_tokens": 2}', "needs .model.: the EAGLE head"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "tree": {"topk": 2}}', "model-based"),
        (
            '{"model": "x", "num_speculative_tokens": 2, "tree": {"topk": 9, "num_draft_tokens": 9}}',
            "topk must be",
        ),
        ('{"method": "ngram", "num_speculative_tokens": 2, "bogus": 1}', "unknown keys"),
    ],
)
def test_bad_speculative_configs_are_refused_naming_the_problem(config, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.parse(config)


def test_a_draft_with_another_vocabulary_is_refused(target, tmp_path):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB + 64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    spec = json.dumps({"model": str(tmp_path), "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="vocabulary"):
        make_engine(target, speculative_config=spec)


def test_a_draft_catching_up_on_long_prompts_splits_its_forward(target):
    """The draft first reads every prompt it has not seen; more than one forward holds is
    fed over several."""
    spec = json.dumps({"model": str(target), "num_speculative_tokens": 2})
    engine = make_engine(target, speculative_config=spec)
    engine.proposer.max_tokens = 20  # below the prompts' total
    prompts = repetitive_prompts(random.Random(4))

    assert run(engine, prompts, 10) == run(make_engine(target), prompts, 10)
    assert engine.scheduler.accepted_draft_tokens == engine.scheduler.draft_tokens > 0


@pytest.fixture(scope="module")
def near_draft(target, tmp_path_factory):
    """The target with its weights perturbed: its first choice is usually the target's, and
    where it is not, the target's is usually among its next few."""
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(target)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.08 * torch.randn(parameter.shape, generator=generator))
    path = tmp_path_factory.mktemp("spec-near-draft")
    model.save_pretrained(path)
    return path


def test_tree_paths_off_the_first_branch_move_their_kv_and_stay_exact(target, near_draft):
    """Accepted paths that run through a later branch have their KV packed behind the known
    tokens; outputs stay those of plain decoding."""
    spec = json.dumps(
        {
            "model": str(near_draft),
            "num_speculative_tokens": 3,
            "tree": {"topk": 4, "num_draft_tokens": 12},
        }
    )
    engine = make_engine(target, speculative_config=spec)
    prompts = repetitive_prompts(random.Random(9))

    assert run(engine, prompts, 32) == run(make_engine(target), prompts, 32)
    assert engine.scheduler.tree_tokens_moved > 0
    assert_pool_entirely_free(engine.kv_manager)


@pytest.mark.parametrize("case", ["chain", "tree"])
def test_logprobs_under_speculation_are_the_targets_own(target, near_draft, case):
    spec = {"model": str(near_draft), "num_speculative_tokens": 3}
    if case == "tree":
        spec["tree"] = {"topk": 3, "num_draft_tokens": 9}
    spec = json.dumps(spec)
    prompts = repetitive_prompts(random.Random(2))[:4]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=3)

    def outputs(engine):
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
        got = {}
        while engine.has_unfinished():
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.new_logprobs or [])
        return got

    speculative = make_engine(target, speculative_config=spec)
    got, expected = outputs(speculative), outputs(make_engine(target))

    assert speculative.scheduler.accepted_draft_tokens > 0
    for rid, want in expected.items():
        assert [lp.token_id for lp in got[rid]] == [lp.token_id for lp in want]
        for a, b in zip(got[rid], want, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


@pytest.mark.parametrize("tree", [False, True])
def test_min_tokens_holds_back_stop_tokens_on_drafted_positions(target, near_draft, tree):
    """The stop token is the target's favourite early on; min_tokens keeps it out of every
    verified position until enough tokens are out, as it does without speculation."""
    prompt = [5, 6, 7, 8]
    plain = make_engine(target)
    first = plain.generate([prompt], greedy(3, ignore_eos=True))[0][0]
    stop = first[1]  # a token greedy decoding emits second
    params = SamplingParams(temperature=0.0, max_tokens=20, min_tokens=8, stop_token_ids=[stop])
    spec = {"model": str(near_draft), "num_speculative_tokens": 3}
    if tree:
        spec["tree"] = {"topk": 3, "num_draft_tokens": 9}
    speculative = make_engine(target, speculative_config=json.dumps(spec))

    got = speculative.generate([prompt], params)[0][0]

    assert got == make_engine(target).generate([prompt], params)[0][0]
    assert stop not in got[:8]
    assert speculative.scheduler.num_drafts > 0
