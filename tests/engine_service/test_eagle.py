"""EAGLE speculation (``"method": "eagle"`` / ``"eagle3"``) on tiny checkpoints.

Heads are written by the tests in the published layouts. What must hold at any acceptance
rate: greedy outputs equal plain decoding's (chains, trees, EAGLE-3's reduced vocabulary;
mixed lengths, prefix hits, chunked prefill, preemption), and every draft is the one the
head computes from the target's own hidden states (checked against a cache-free reference
on ``transformers``' hidden states). A head that nearly copies a one-layer target gets
drafts accepted, so multi-token catch-ups and accepted tree paths off the first branch
(whose features move with their KV) are exercised too. Heads that do not fit are refused.
"""

from __future__ import annotations

import json
import random

import pytest
import transformers

from engine_service.engine import SamplingParams
from engine_service.engine.batch import DeviceDrafts
from tests.engine_service.eagle_heads import (
    ReferenceHead,
    make_copyable_target,
    make_four_layer_target,
    write_copying_head,
    write_eagle_head,
)
from tests.engine_service.helpers import (
    EOS,
    VOCAB,
    assert_pool_entirely_free,
    greedy,
    make_engine,
    run_all,
    tokens_of,
)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """Four layers, so that an EAGLE-3 head has low, middle and high layers to read."""
    path = tmp_path_factory.mktemp("eagle-target")
    make_four_layer_target(path)
    return path


@pytest.fixture(scope="module")
def heads(target, tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle-heads")
    return {
        "eagle": write_eagle_head(root / "e1", target, 1),
        # A reduced vocabulary through d2t, the target's embedding (none shipped).
        "eagle3": write_eagle_head(
            root / "e3", target, 3, draft_vocab=200, aux_layers=(0, 2, 3), with_embedding=False
        ),
    }


@pytest.fixture(scope="module")
def copyable(tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle-copy")
    make_copyable_target(root / "target", VOCAB, EOS)
    write_copying_head(root / "head", root / "target")
    return root / "target", root / "head"


def prompts_with_prefix_hits(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (6, 13, 30, 9, 41, 1)]
    return [*prompts, [*prompts[2][:16], 7, 8, 9], [*prompts[2][:16], 10, 11]]


def run(engine, prompts, max_tokens=24):
    return [samples[0] for samples in engine.generate(prompts, greedy(max_tokens, ignore_eos=True))]


def spec_for(case: str, heads) -> dict:
    method = "eagle3" if case.startswith("eagle3") else "eagle"
    spec = {"method": method, "model": str(heads[method]), "num_speculative_tokens": 3}
    if case.endswith("tree"):
        spec["tree"] = {"topk": 3, "num_draft_tokens": 8}
    return spec


SETTINGS = {
    "plain": {},
    "chunked": {"max_num_batched_tokens": 16},  # prompts chunked beside verifying sequences
    "tight-pool": {"num_kv_blocks": 24},  # preemption while drafting
}


@pytest.fixture(scope="module")
def plain_outputs(target):
    """Plain decoding's outputs per settings, computed once."""
    cache = {}

    def outputs(settings: str):
        if settings not in cache:
            engine = make_engine(target, **SETTINGS[settings])
            cache[settings] = run(engine, prompts_with_prefix_hits(1), 16)
        return cache[settings]

    return outputs


@pytest.mark.parametrize(
    ("case", "settings"),
    [
        ("eagle", "plain"),
        ("eagle", "chunked"),
        ("eagle", "tight-pool"),
        ("eagle_tree", "chunked"),
        ("eagle_tree", "tight-pool"),
        ("eagle3", "chunked"),
        ("eagle3_tree", "tight-pool"),
    ],
)
def test_greedy_eagle_equals_plain_decoding(target, heads, plain_outputs, case, settings):
    speculative = make_engine(
        target, speculative_config=json.dumps(spec_for(case, heads)), **SETTINGS[settings]
    )

    assert run(speculative, prompts_with_prefix_hits(1), 16) == plain_outputs(settings)
    assert speculative.scheduler.num_drafts > 0
    assert_pool_entirely_free(speculative.kv_manager)


def record_proposals(engine):
    """Wrap the proposer: every proposal with the known tokens it was made after."""
    proposer, seen = engine.proposer, []
    propose = proposer.propose

    def recording(batch):
        proposal = propose(batch)
        drafts = proposal
        if isinstance(proposal, DeviceDrafts):  # read back here, for the record only
            drafts = proposal.to_host()
        parents = proposer.tree_parents()
        for index, tokens in drafts.items():
            known = list(batch.sequences[index].request.all_token_ids)
            seen.append((known, tokens, parents.get(index)))
        return proposal

    proposer.propose = recording
    return seen


@pytest.mark.parametrize("case", ["eagle", "eagle_tree", "eagle3", "eagle3_tree"])
def test_drafts_are_the_heads_own_on_the_targets_hidden_states(target, heads, case):
    """Every proposal equals the cache-free reference's: the features (final hidden state,
    or the three layers' inputs), the shift by one token, the head's own KV, the feedback of
    its output, EAGLE-3's d2t map, and the tree growth all as the published heads mean."""
    spec = spec_for(case, heads)
    engine = make_engine(target, speculative_config=json.dumps(spec))
    proposals = record_proposals(engine)
    # No two prompts share a block here: see EagleProposer on shared blocks' last entries.
    run(engine, prompts_with_prefix_hits(2)[:6], 8)
    model = transformers.LlamaForCausalLM.from_pretrained(target).eval()
    reference = ReferenceHead(heads[spec["method"]], model, 3 if "3" in case else 1)

    assert len(proposals) > 10
    for known, drafts, parents in proposals:
        if parents is None:
            assert drafts == reference.chain(known, len(drafts)), known
        else:
            assert (drafts, parents) == reference.tree(known, 3, 3, len(drafts)), known


@pytest.mark.parametrize(
    ("tree", "settings"), [(False, "plain"), (True, "plain"), (True, "tight-pool")]
)
def test_accepted_drafts_feed_the_head_exactly(copyable, tree, settings):
    """A head that usually agrees with its target: runs of accepted drafts (and tree paths
    through later branches) are committed, the head catches up on them from their features,
    and outputs stay plain decoding's; its drafts stay the reference's."""
    target, head = copyable
    spec = {"method": "eagle", "model": str(head), "num_speculative_tokens": 4}
    if tree:
        spec["tree"] = {"topk": 3, "num_draft_tokens": 10}
    engine = make_engine(target, speculative_config=json.dumps(spec), **SETTINGS[settings])
    proposals = record_proposals(engine)
    prompts = prompts_with_prefix_hits(3)[:6]  # no shared blocks (see the test above)

    assert run(engine, prompts) == run(make_engine(target, **SETTINGS[settings]), prompts)
    stats = engine.scheduler
    assert stats.accepted_per_position[2] > 0  # some rounds kept three drafts or more
    assert stats.accepted_draft_tokens > stats.num_drafts // 2
    if tree:
        assert stats.tree_tokens_moved > 0
    assert_pool_entirely_free(engine.kv_manager)
    reference = ReferenceHead(head, transformers.LlamaForCausalLM.from_pretrained(target), 1)
    for known, drafts, parents in proposals[::7]:
        if parents is None:
            assert drafts == reference.chain(known, len(drafts))
        else:
            assert (drafts, parents) == reference.tree(known, 4, 3, len(drafts))


def test_sampled_and_penalised_samples_on_eagle_trees_equal_plain_decoding(copyable):
    """Seeded sampled samples (with top-p, with penalties, n = 2) and a penalised greedy one
    verify EAGLE trees beside each other: each gets exactly its tokens without speculation,
    with drafts accepted along paths through later branches."""
    target, head = copyable
    spec = {
        "method": "eagle",
        "model": str(head),
        "num_speculative_tokens": 4,
        "tree": {"topk": 3, "num_draft_tokens": 10},
    }
    prompts = prompts_with_prefix_hits(3)[:4]
    params = [
        SamplingParams(temperature=0.7, seed=1, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.8, seed=2, max_tokens=24, ignore_eos=True),
        SamplingParams(
            n=2, temperature=0.8, seed=3, frequency_penalty=0.4, max_tokens=24, ignore_eos=True
        ),
        greedy(24, ignore_eos=True, presence_penalty=0.6),
    ]

    def outputs(engine):
        for i, (prompt, sampling) in enumerate(zip(prompts, params, strict=True)):
            engine.add_request(f"r{i}", prompt, sampling)
        return {key: tokens_of(out) for key, out in run_all(engine).items()}

    engine = make_engine(target, speculative_config=json.dumps(spec))
    assert outputs(engine) == outputs(make_engine(target))
    assert engine.scheduler.accepted_draft_tokens > engine.scheduler.num_drafts // 2
    assert engine.scheduler.tree_tokens_moved > 0
    assert_pool_entirely_free(engine.kv_manager)


@pytest.mark.parametrize(
    ("method", "write", "message"),
    [
        ("eagle", dict(version=1, overrides={"hidden_size": 96}), "hidden size"),
        ("eagle", dict(version=1, overrides={"vocab_size": VOCAB + 8}), "vocabulary"),
        ("eagle", dict(version=3), "is an EAGLE-3 head"),
        ("eagle3", dict(version=1), "not an EAGLE-3 head"),
        ("eagle3", dict(version=3, overrides={"target_hidden_size": 32}), "features of width"),
        ("eagle3", dict(version=3, aux_layers=(0, 2, 9)), "layers \\[9\\]"),
    ],
)
def test_a_head_that_does_not_fit_the_target_is_refused(target, tmp_path, method, write, message):
    head = write_eagle_head(tmp_path / "head", target, **write)
    spec = json.dumps({"method": method, "model": str(head), "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match=message):
        make_engine(target, speculative_config=spec)


def test_a_head_whose_d2t_leaves_the_vocabulary_is_refused(target, tmp_path):
    from safetensors.torch import load_file, save_file

    head = write_eagle_head(tmp_path / "head", target, 3, draft_vocab=100)
    tensors = load_file(str(head / "model.safetensors"))
    tensors["d2t"][-1] += VOCAB
    save_file(tensors, str(head / "model.safetensors"))
    spec = json.dumps({"method": "eagle3", "model": str(head), "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="outside the target's vocabulary"):
        make_engine(target, speculative_config=spec)
