"""Speculative decoding on several ranks (CPU, gloo, two or four processes): n-gram lookup,
draft models and EAGLE heads under tensor parallelism, under data-parallel attention and
with tensor-parallel groups inside data-parallel ranks, give plain single-process decoding's
greedy tokens (MTP under tensor parallelism is test_tensor_parallel.py's); and the proposals are the
ones a single process makes (the split draft model, the head fed by every rank's own
features and the target's vocabulary-parallel embedding and ``lm_head`` draft exactly what
their whole single-rank selves draft). Combinations that cannot work are refused by name.

The test process is rank 0; each parallel engine starts the other ranks as child processes.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from engine_service.engine import EngineConfig
from engine_service.engine.batch import DeviceDrafts
from tests.engine_service.conftest import make_checkpoint
from tests.engine_service.eagle_heads import (
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
)
from tests.engine_service.test_speculative import repetitive_prompts

TP = {"tensor_parallel_size": 2}
DP = {"data_parallel_size": 2}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A four-layer target (EAGLE-3 reads layers 0, 2 and 3), its EAGLE-1 and EAGLE-3 heads
    (the latter with a reduced vocabulary and the target's embedding), a draft model close
    to the target (drafts often accepted, accepted tree paths off the first branch), a
    one-layer target with a head that nearly copies it, and a draft whose three attention
    heads do not split over two ranks."""
    root = tmp_path_factory.mktemp("spec-parallel")
    target = make_four_layer_target(root / "target")
    write_eagle_head(root / "eagle", root / "target", 1)
    write_eagle_head(
        root / "eagle3",
        root / "target",
        3,
        draft_vocab=200,
        aux_layers=(0, 2, 3),
        with_embedding=False,
    )
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in target.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    target.save_pretrained(root / "draft")
    make_copyable_target(root / "copy-target", VOCAB, EOS)
    # Features count more than in test_eagle's copying head: a rank that read wrong ones
    # would draft differently.
    write_copying_head(root / "copy-head", root / "copy-target", feature_scale=0.02)
    make_checkpoint(
        root / "odd-draft",
        "llama",
        vocab_size=VOCAB,
        hidden_size=96,
        num_attention_heads=3,
        num_key_value_heads=3,
    )
    return root


def spec_for(case: str, root) -> dict:
    """The speculative config of a test case: ``ngram``, ``draft`` / ``draft_tree`` (the
    perturbed target), ``eagle`` / ``eagle_tree`` / ``eagle3``, ``copy_tree`` (the copying
    head on the one-layer target)."""
    if case == "ngram":
        return {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    if case.startswith("draft"):
        spec = {"model": str(root / "draft"), "num_speculative_tokens": 3}
    elif case.startswith("copy"):
        spec = {"method": "eagle", "model": str(root / "copy-head"), "num_speculative_tokens": 4}
    else:
        method = "eagle3" if case.startswith("eagle3") else "eagle"
        spec = {"method": method, "model": str(root / method), "num_speculative_tokens": 3}
    if case.endswith("tree"):
        spec["tree"] = {"topk": 3, "num_draft_tokens": 8}
    return spec


def record_proposals(engine) -> dict:
    """Wrap every data-parallel rank's proposer: the drafts (and tree parents) proposed
    after each sequence of known tokens."""
    seen: dict = {}
    wrapped = set()
    for shard in engine._shards:
        proposer = shard.proposer
        if id(proposer) in wrapped:  # n-gram lookup: one proposer for all ranks
            continue
        wrapped.add(id(proposer))

        def recording(batch, proposer=proposer, propose=proposer.propose):
            proposal = propose(batch)
            drafts = proposal
            if isinstance(proposal, DeviceDrafts):  # read back here, for the record only
                drafts = proposal.to_host()
            parents = proposer.tree_parents()
            for index, tokens in drafts.items():
                known = tuple(batch.sequences[index].request.all_token_ids)
                seen[known] = (tokens, parents.get(index))
            return proposal

        proposer.propose = recording
    return seen


def prompts_for(case: str) -> list[list[int]]:
    """Mixed lengths; n-gram lookup gets prompts that repeat spans. No two prompts share a
    block, so every proposal is a function of its tokens alone (see EagleProposer)."""
    rng = random.Random(4)
    if case == "ngram":
        return repetitive_prompts(rng)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (6, 13, 30, 9, 23)]


def outputs_and_proposals(engine, prompts, max_tokens=10):
    proposals = record_proposals(engine)
    try:
        outputs = engine.generate(prompts, greedy(max_tokens, ignore_eos=True))
        stats = engine.stats()
        for shard in engine._shards:
            assert_pool_entirely_free(shard.kv_manager)
    finally:
        engine.close()
    return [samples[0] for samples in outputs], proposals, stats


# -- tensor parallelism ---------------------------------------------------------------------

# The tight pool preempts drafting sequences; the short step budget chunks prompts beside
# verifying ones.
SETTINGS = {"plain": {}, "chunked": {"max_num_batched_tokens": 16}, "tight": {"num_kv_blocks": 28}}


@pytest.mark.parametrize(
    ("case", "settings"),
    [
        ("ngram", "chunked"),
        ("draft_tree", "tight"),
        ("eagle", "chunked"),
        ("eagle_tree", "plain"),
        ("eagle3", "tight"),
        ("copy_tree", "tight"),
    ],
)
def test_every_method_under_tensor_parallelism_drafts_and_decodes_as_one_process(
    checkpoints, case, settings
):
    """TP=2 with speculation gives plain one-process decoding's tokens, and proposes exactly
    what one process with the same speculation proposes: the draft model split over the
    ranks, the EAGLE head on every rank (each reading its own copy of the target's features,
    the embedding summed and the logits gathered over the vocabulary split, EAGLE-3's d2t on
    rank 0), tree paths accepted off the first branch moving the features on every rank."""
    target = checkpoints / ("copy-target" if case.startswith("copy") else "target")
    knobs = SETTINGS[settings]
    spec = json.dumps(spec_for(case, checkpoints))
    prompts = prompts_for(case)
    plain = [
        s[0] for s in make_engine(target, **knobs).generate(prompts, greedy(10, ignore_eos=True))
    ]
    one_rank, expected_proposals, _ = outputs_and_proposals(
        make_engine(target, speculative_config=spec, **knobs), prompts
    )
    engine = make_engine(target, speculative_config=spec, **knobs, **TP)
    if case.startswith(("draft", "eagle", "copy")):
        assert engine.proposer.runner.channel is not None  # its steps run on both ranks
    if case.startswith("draft"):
        attn = engine.proposer.runner.model.model.layers[0].self_attn
        assert attn.num_heads == 2  # half of the draft's four
    outputs, proposals, stats = outputs_and_proposals(engine, prompts)

    assert one_rank == plain
    assert outputs == plain
    assert stats.spec_num_drafts > 0
    assert proposals == expected_proposals
    if settings == "tight":
        assert stats.num_preemptions > 0
    if case in ("draft_tree", "copy_tree"):
        assert stats.spec_num_accepted_tokens > stats.spec_num_drafts // 3
        assert engine.scheduler.tree_tokens_moved > 0


def test_a_draft_that_does_not_split_runs_whole_on_the_first_rank(checkpoints):
    """A draft whose attention heads do not divide over the ranks is refused with the way
    out; with ``draft_tensor_parallel_size`` 1 it drafts whole on rank 0 (rank 1 holds none
    of it) and the tokens stay plain decoding's."""
    target = checkpoints / "target"
    spec = {"model": str(checkpoints / "odd-draft"), "num_speculative_tokens": 3}
    with pytest.raises(ValueError, match='"draft_tensor_parallel_size": 1'):
        make_engine(target, speculative_config=json.dumps(spec), **TP)
    prompts = prompts_for("draft")
    plain = [s[0] for s in make_engine(target).generate(prompts, greedy(10, ignore_eos=True))]
    spec["draft_tensor_parallel_size"] = 1
    engine = make_engine(target, speculative_config=json.dumps(spec), **TP)
    assert engine.proposer.runner.channel is None
    outputs, _, stats = outputs_and_proposals(engine, prompts)

    assert outputs == plain
    assert stats.spec_num_drafts > 0


# -- data parallelism -----------------------------------------------------------------------


@pytest.mark.parametrize("case", ["ngram", "eagle_tree", "eagle3", "draft_tree"])
def test_each_data_parallel_rank_drafts_for_its_own_batch(checkpoints, case):
    """DP=2 (a dense model, replicated): each rank's requests are drafted for by its own
    proposer, a model-based one running in that rank's process on its own features and
    caches; tokens are one process's plain decoding, and every proposal is the one a single
    process makes for the same tokens."""
    target = checkpoints / "target"
    spec = json.dumps(spec_for(case, checkpoints))
    prompts = prompts_for(case)
    plain = [s[0] for s in make_engine(target).generate(prompts, greedy(10, ignore_eos=True))]
    _, expected_proposals, _ = outputs_and_proposals(
        make_engine(target, speculative_config=spec), prompts
    )
    engine = make_engine(target, speculative_config=spec, **DP)
    outputs, proposals, stats = outputs_and_proposals(engine, prompts)

    assert outputs == plain
    assert all(s.scheduler.num_drafts > 0 for s in engine._shards)  # both ranks drafted
    assert stats.spec_num_drafts == sum(s.scheduler.num_drafts for s in engine._shards)
    assert proposals == expected_proposals


@pytest.mark.parametrize("case", ["eagle3", "draft_tree"])
def test_tensor_parallel_groups_inside_data_parallel_ranks_draft_as_one_process(checkpoints, case):
    """DP=2 x TP=2, four processes: each data-parallel rank's proposer model splits over its
    group (the draft model like the target; the EAGLE-3 head whole on both, with the group's
    vocabulary-parallel embedding), rank 0 sends each group its draft steps, and the group's
    first rank alone sends the results back. Tokens and proposals are one process's."""
    target = checkpoints / "target"
    spec = json.dumps(spec_for(case, checkpoints))
    prompts = prompts_for(case)[:4]
    plain = [s[0] for s in make_engine(target).generate(prompts, greedy(10, ignore_eos=True))]
    _, expected_proposals, _ = outputs_and_proposals(
        make_engine(target, speculative_config=spec), prompts
    )
    engine = make_engine(target, speculative_config=spec, **DP, **TP)
    outputs, proposals, _ = outputs_and_proposals(engine, prompts)

    assert outputs == plain
    assert all(s.scheduler.num_drafts > 0 for s in engine._shards)
    assert proposals == expected_proposals


def test_eagle_under_data_parallel_attention_with_expert_parallel_moe(tmp_path):
    """Mixtral at DP=2 with EP: the ranks' head steps run between the lockstep target steps
    (an idle rank's dummy batches included) without crossing the MoE exchanges."""
    make_checkpoint(tmp_path / "mixtral", "mixtral")
    write_eagle_head(tmp_path / "head", tmp_path / "mixtral", 1)
    vocab = json.loads((tmp_path / "mixtral" / "config.json").read_text())["vocab_size"]
    rng = random.Random(6)
    # Rank 0 takes the first and third, rank 1 the second, which finishes first.
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (21, 5, 14)]
    params = [greedy(12, ignore_eos=True), greedy(5, ignore_eos=True), greedy(12, ignore_eos=True)]
    plain = make_engine(tmp_path / "mixtral").generate(prompts, params)
    spec = {"method": "eagle", "model": str(tmp_path / "head"), "num_speculative_tokens": 3}
    engine = make_engine(
        tmp_path / "mixtral",
        speculative_config=json.dumps(spec),
        enable_expert_parallel=True,
        **DP,
    )
    try:
        assert engine.generate(prompts, params) == plain
        assert engine.dummy_steps > 0  # rank 1 finished early and idled
        assert all(s.scheduler.num_drafts > 0 for s in engine._shards)
    finally:
        engine.close()


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parallel", "spec", "message"),
    [
        (DP, {"method": "mtp"}, '"mtp" is not supported with data_parallel_size > 1'),
        (
            TP,
            {"method": "mtp", "draft_tensor_parallel_size": 1},
            "the MTP layers run on every tensor-parallel rank",
        ),
        (
            TP,
            {"method": "eagle", "model": "h", "draft_tensor_parallel_size": 1},
            "an EAGLE head runs on every tensor-parallel rank",
        ),
        (
            TP,
            {"model": "d", "draft_tensor_parallel_size": 3},
            "must be 1 .* or the target's tensor_parallel_size 2, got 3",
        ),
        (
            DP,
            {"model": "d", "draft_tensor_parallel_size": 2},
            "tensor_parallel_size 1, got 2",
        ),
        (
            {**DP, **TP},
            {"model": "d", "draft_tensor_parallel_size": 1},
            "splits over its tensor-parallel group",
        ),
    ],
)
def test_what_cannot_draft_over_several_ranks_is_refused_with_the_reason(parallel, spec, message):
    config = json.dumps({"num_speculative_tokens": 2, **spec})
    with pytest.raises(ValueError, match=message):
        EngineConfig(model="m", speculative_config=config, **parallel)
