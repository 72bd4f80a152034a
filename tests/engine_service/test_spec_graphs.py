"""The CUDA-graph path of speculative decoding, through its CPU twin.

CI has no GPU, so the graphs run with ``capture=False``: every step the GPU would replay is
copied into the same static, padded buffers and run eagerly on them (SDPA backend). That
covers the target's tree-verification graphs (the static mask buffer), the proposers' step
graphs (catch-ups, tree rounds; an EAGLE head's static hidden-input rows) and the chain
graphs (every draft after the first derived on the device: positions, slots through the
block tables, lengths, argmax fed back, rows past their depth kept on the scratch block).
Drafts must equal the eager proposer's, one for one, and outputs plain decoding's.
``bench/gpu_check.py`` runs the captured graphs themselves on a GPU.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from engine_service.engine import SamplingParams
from engine_service.engine.batch import DeviceDrafts, tree_mask
from engine_service.engine.cuda_graphs import StepGraphs
from engine_service.engine.spec.graphs import DraftModelCalls, TreeGraphs
from engine_service.engine.spec.proposers import _Tree
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
    make_llama_checkpoint,
    run_all,
    tokens_of,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A copyable one-layer target with a head that usually agrees with it (long accepted
    runs: multi-token catch-ups, tree paths off the first branch), a four-layer target with
    a random EAGLE-3 head (reduced vocabulary through d2t), a two-layer target with a
    perturbed copy of itself as a draft model."""
    root = tmp_path_factory.mktemp("spec-graphs")
    make_copyable_target(root / "copyable", VOCAB, EOS)
    write_copying_head(root / "copying-head", root / "copyable")
    make_four_layer_target(root / "four")
    write_eagle_head(
        root / "eagle3",
        root / "four",
        3,
        draft_vocab=200,
        aux_layers=(0, 2, 3),
        with_embedding=False,
    )
    target = make_llama_checkpoint(root / "two")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in target.parameters():
            parameter.add_(0.08 * torch.randn(parameter.shape, generator=generator))
    target.save_pretrained(root / "near-draft")
    return root


def case(models, name: str) -> tuple[object, dict]:
    """(target path, speculative config) of a case."""
    tree = {"topk": 3, "num_draft_tokens": 9}
    if name.startswith("eagle3"):
        spec = {"method": "eagle3", "model": str(models / "eagle3"), "num_speculative_tokens": 4}
        target = models / "four"
    elif name.startswith("eagle"):
        spec = {
            "method": "eagle",
            "model": str(models / "copying-head"),
            "num_speculative_tokens": 4,
        }
        target = models / "copyable"
    elif name == "draft_self":  # the target as its own draft: every draft accepted
        spec = {"model": str(models / "two"), "num_speculative_tokens": 4}
        target = models / "two"
    else:
        spec = {"model": str(models / "near-draft"), "num_speculative_tokens": 3}
        target = models / "two"
    if name.endswith("tree"):
        spec["tree"] = tree
    return target, spec


def with_twin_graphs(engine, max_tokens: int, max_seqs: int):
    """The engine with the CPU twins of the graphs a CUDA engine captures: the target's
    (tree masks included) and the proposer's."""
    runner = engine.runner
    runner.graphs = StepGraphs(runner, max_tokens, max_seqs, capture=False, mixed=True, trees=True)
    engine.proposer.capture_graphs(max_tokens, max_seqs, capture=False)
    return engine


def record_proposals(engine) -> list:
    """Every proposal, with the known tokens it was made after."""
    proposer, seen = engine.proposer, []
    propose = proposer.propose

    def recording(batch):
        proposal = propose(batch)
        drafts = proposal
        parents = proposer.tree_parents()
        if isinstance(proposal, DeviceDrafts):  # read back here, for the record only
            drafts = proposal.to_host()
            parents = proposal.parents_to_host() or parents
            engine.device_proposals = getattr(engine, "device_proposals", 0) + 1
            if proposal.parents is not None:
                engine.device_trees = getattr(engine, "device_trees", 0) + 1
        seen.extend(
            (list(batch.sequences[i].request.all_token_ids), tokens, parents.get(i))
            for i, tokens in sorted(drafts.items())
        )
        return proposal

    proposer.propose = recording
    return seen


def prompts(seed: int) -> list[list[int]]:
    """Mixed lengths (some catch-ups fit a graph, some run eagerly), two sharing a prefix."""
    rng = random.Random(seed)
    out = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (5, 12, 3, 27, 8, 2)]
    return [*out, [*out[3][:16], 7, 8], [*out[3][:16], 9]]


def run(engine, batch, max_tokens=20):
    outputs = engine.generate(batch, greedy(max_tokens, ignore_eos=True))
    return [samples[0] for samples in outputs]


@pytest.mark.parametrize(
    ("name", "settings", "max_seqs"),
    [
        ("eagle", {}, 8),
        ("eagle", {"max_num_batched_tokens": 16}, 4),  # chunked; chains split over buckets
        ("eagle_tree", {}, 8),
        ("eagle_tree", {"num_kv_blocks": 28}, 8),  # preemption while drafting
        ("eagle3", {}, 8),
        ("draft_self", {}, 8),
        ("draft_tree", {"max_num_batched_tokens": 16}, 8),
    ],
)
def test_padded_proposer_and_tree_graphs_give_the_eager_drafts(models, name, settings, max_seqs):
    target, spec = case(models, name)
    config = dict(speculative_config=json.dumps(spec), **settings)
    eager = make_engine(target, **config)
    twin = with_twin_graphs(make_engine(target, **config), max_tokens=48, max_seqs=max_seqs)
    eager_drafts, twin_drafts = record_proposals(eager), record_proposals(twin)
    batch = prompts(1)

    expected = run(make_engine(target, **settings), batch)
    assert run(eager, batch) == expected
    assert run(twin, batch) == expected
    assert twin_drafts == eager_drafts
    if name != "eagle3":  # a random head: acceptance by chance
        assert twin.scheduler.accepted_draft_tokens > 0
    assert_pool_entirely_free(twin.kv_manager)

    # Every graph kind the case can use was used.
    proposer = twin.proposer
    steps, target_steps = proposer.runner.graphs.replays, twin.runner.graphs.replays
    if name.endswith("tree"):
        assert proposer.tree_graphs.replays > 0 and target_steps.get("tree", 0) > 0, target_steps
        if name.startswith("eagle"):
            # The head's catch-up over a round's accepted tokens ran inside the tree's
            # graph (and gave the drafts of the eager catch-up step, checked above).
            assert proposer.tree_graphs.catch_up_replays > 0
        assert proposer.chain_graphs is None  # with a tree, every sample drafts one
        # Full trees of greedy samples keep their shape on the device through the step.
        assert getattr(twin, "device_trees", 0) > 0
        # Trees with less draft room (near max_tokens) grow round by round, in step graphs.
        assert steps.get("tree", 0) > 0, steps
    else:
        assert proposer.chain_graphs.replays > 0
        # Chains stay on the device: the target's step and the verification read them there.
        assert getattr(twin, "device_proposals", 0) > 0
        assert target_steps.get("mixed", 0) > 0, target_steps
    assert steps.get("decode", 0) + steps.get("mixed", 0) > 0, steps  # catch-ups
    if name in ("eagle", "draft_self"):
        assert steps.get("mixed", 0) > 0, steps  # catch-ups over accepted runs


def test_sampled_and_penalised_trees_through_the_graphs_equal_plain_decoding(models):
    """Seeded sampled samples (top-p, penalties, n = 2) beside a penalised greedy one, all
    drafting trees grown in the tree graphs and verified in the target's tree graphs: each
    gets its tokens without speculation, from the eager proposer's drafts."""
    target, spec = case(models, "eagle_tree")
    params = [
        SamplingParams(temperature=0.7, seed=1, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.8, seed=2, max_tokens=20, ignore_eos=True),
        SamplingParams(
            n=2, temperature=0.8, seed=3, frequency_penalty=0.4, max_tokens=20, ignore_eos=True
        ),
        greedy(20, ignore_eos=True, presence_penalty=0.6),
    ]
    batch = prompts(3)[:4]

    def outputs(engine):
        for i, (prompt, sampling) in enumerate(zip(batch, params, strict=True)):
            engine.add_request(f"r{i}", prompt, sampling)
        return {key: tokens_of(out) for key, out in run_all(engine).items()}

    config = dict(speculative_config=json.dumps(spec))
    eager = make_engine(target, **config)
    twin = with_twin_graphs(make_engine(target, **config), max_tokens=48, max_seqs=8)
    eager_drafts, twin_drafts = record_proposals(eager), record_proposals(twin)

    expected = outputs(make_engine(target))
    assert outputs(eager) == expected
    assert outputs(twin) == expected
    assert twin_drafts == eager_drafts
    assert twin.proposer.tree_graphs.replays > 0
    assert twin.runner.graphs.replays.get("tree", 0) > 0
    assert twin.scheduler.accepted_draft_tokens > 0
    # Seeds and penalties lay the trees out on the host: none stayed on the device.
    assert getattr(twin, "device_trees", 0) == 0
    assert_pool_entirely_free(twin.kv_manager)


def test_device_chains_with_sampling_and_logprobs_equal_plain_decoding(models):
    """Chains that stay on the device (the target and the verification read them there)
    serve seeded sampled samples, greedy ones asking for logprobs and min_tokens beside
    each other: tokens and logprobs equal plain decoding's."""
    target, spec = case(models, "eagle")
    params = [
        SamplingParams(temperature=0.7, seed=1, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=5, seed=2, max_tokens=20, ignore_eos=True),
        greedy(20, ignore_eos=True, logprobs=2),
        greedy(20, min_tokens=12, logprobs=0),
    ]
    batch = prompts(5)[:4]

    def outputs(engine):
        for i, (prompt, sampling) in enumerate(zip(batch, params, strict=True)):
            engine.add_request(f"r{i}", prompt, sampling)
        got = run_all(engine)
        tokens = {key: tokens_of(out) for key, out in got.items()}
        logprobs = {
            key: [(lp.token_id, round(lp.logprob, 4), [t for t, _ in lp.top]) for lp in lps]
            for key, out in got.items()
            for lps in [[lp for o in out for lp in o.new_logprobs or []]]
        }
        return tokens, logprobs

    twin = with_twin_graphs(
        make_engine(target, speculative_config=json.dumps(spec)), max_tokens=48, max_seqs=8
    )
    record_proposals(twin)

    assert outputs(twin) == outputs(make_engine(target))
    assert getattr(twin, "device_proposals", 0) > 0
    assert twin.scheduler.accepted_draft_tokens > 0
    assert_pool_entirely_free(twin.kv_manager)


def test_chain_rows_past_their_depth_touch_only_the_scratch_block(models):
    """A chain row with less draft room stops early: its later steps must write their K/V
    into the scratch block, never into blocks of its own or another sequence's table."""
    target, spec = case(models, "draft_self")
    engine = with_twin_graphs(make_engine(target, speculative_config=json.dumps(spec)), 24, 8)
    proposer = engine.proposer
    runner, chains = proposer.runner, proposer.chain_graphs
    block = runner.block_size
    cache = runner.kv_cache
    cache.zero_()
    first = torch.tensor([5, 6])
    # Row 0 drafts 3 steps from index 9, row 1 none (depth 0) from index 2.
    tables = [[3, 4, 5, 6], [7, 8]]
    drafts = chains.run(first, None, [9, 2], [3, 0], tables)

    assert drafts.shape == (2, proposer.num_tokens - 1)
    written = {int(b) for b in torch.nonzero(cache.flatten(1).abs().sum(1)).flatten()}
    # Indices 9, 10, 11 of row 0: blocks 9 // 4 = 2 and 11 // 4 = 2, i.e. table[2] = 5.
    assert written == {5, runner.scratch_block}
    assert cache[5, :, :, : 9 % block].abs().sum() == 0  # offsets before index 9 untouched


def test_tree_growth_on_the_device_orders_ties_as_the_host_does(models):
    """The device's choice of new nodes (TreeGraphs) against the host's (_Tree.extend) on
    log-probabilities and path scores full of exact ties: by score, then node, then token,
    all descending; depths and ancestor masks follow the chosen parents."""
    target, spec = case(models, "draft_tree")
    runner = make_engine(target, speculative_config=json.dumps(spec)).proposer.runner
    # Rows are logits already: the test hands _extend the frontier's rows directly.
    calls = DraftModelCalls(forward=None, logits=lambda rows: rows)
    topk, size, trees = 3, 9, 2
    graphs = TreeGraphs(runner, calls, topk, size, 3, trees, capture=False)
    generator = torch.Generator().manual_seed(0)
    for _ in range(25):
        logits = torch.randint(-2, 1, (trees, topk, 7), generator=generator).float()
        scores = torch.randint(-2, 1, (trees, topk), generator=generator).double() / 2
        graphs.scores[:trees, :topk] = scores
        graphs.depths.zero_()
        graphs.depths[:, 1 : topk + 1] = 1
        graphs.ancestors.zero_()
        graphs.ancestors[:, :topk] = graphs.eye[:topk]

        graphs._extend(logits, topk, topk, topk)

        for b in range(trees):
            host = _Tree(size, [0] * topk, scores[b].tolist())
            host.extend(logits[b].log_softmax(-1), topk)
            assert graphs.parents[b, topk : 2 * topk].tolist() == host.parents[topk:]
            assert graphs.tokens[b, topk : 2 * topk].tolist() == host.tokens[topk:]
            assert graphs.scores[b, topk : 2 * topk].tolist() == host.scores[topk:]
            mask, depths = tree_mask(host.parents)
            assert graphs.depths[b, : 2 * topk + 1].tolist() == depths
            assert torch.equal(graphs.ancestors[b, : 2 * topk, : 2 * topk], mask[1:, 1:])


@pytest.mark.parametrize("name", ["eagle_tree", "draft_tree"])
def test_device_trees_beside_prefill_chunks_logprobs_and_host_trees(models, name):
    """Trees that keep their shape on the device (mask, depth positions and the walk built
    there) in steps that also carry other requests' prompt chunks (the drafts' rows then go
    through an index), greedy samples asking for logprobs, and a round where one request's
    ``min_tokens`` sends every tree to the host (as do trees cut short by the step's token
    budget): tokens and logprobs equal plain decoding's."""
    target, spec = case(models, name)
    first, later = prompts(7)[:3], prompts(8)[3:6]
    params = [
        greedy(18, ignore_eos=True, logprobs=2),
        greedy(18, ignore_eos=True),
        greedy(18, ignore_eos=True, min_tokens=6),
    ]

    def outputs(engine):
        for i, prompt in enumerate(first):
            engine.add_request(f"a{i}", prompt, params[i])
        got: dict = {}
        for _ in range(4):  # the first requests are verifying trees when the next arrive
            for output in engine.step():
                got.setdefault((output.request_id, output.index), []).append(output)
        for i, prompt in enumerate(later):
            engine.add_request(f"b{i}", prompt, params[i % 2])
        for key, outs in run_all(engine).items():
            got.setdefault(key, []).extend(outs)
        tokens = {key: tokens_of(out) for key, out in got.items()}
        logprobs = {
            key: [(lp.token_id, lp.logprob, [t for t, _ in lp.top]) for lp in lps]
            for key, out in got.items()
            for lps in [[lp for o in out for lp in o.new_logprobs or []]]
        }
        return tokens, logprobs

    config = dict(speculative_config=json.dumps(spec), max_num_batched_tokens=48)
    twin = with_twin_graphs(make_engine(target, **config), max_tokens=48, max_seqs=8)
    record_proposals(twin)
    placed_rows = []
    prepare = twin.runner.prepare

    def recording_prepare(batch, *args):
        inputs = prepare(batch, *args)
        if any(s.device_tree for s in batch.sequences):
            placed_rows.append(inputs.draft_rows is not None)
        return inputs

    twin.runner.prepare = recording_prepare

    tokens, logprobs = outputs(twin)
    expected_tokens, expected_logprobs = outputs(make_engine(target, max_num_batched_tokens=48))
    assert tokens == expected_tokens
    assert logprobs.keys() == expected_logprobs.keys()
    for key, expected in expected_logprobs.items():
        assert [(t, top) for t, _, top in logprobs[key]] == [(t, top) for t, _, top in expected]
        # fp32: a verification's GEMM shapes round differently from a decode step's.
        assert [lp for _, lp, _ in logprobs[key]] == pytest.approx(
            [lp for _, lp, _ in expected], abs=1e-4
        )
    assert getattr(twin, "device_trees", 0) > 0
    assert True in placed_rows  # some device trees shared a step with a prompt chunk
    assert twin.scheduler.accepted_draft_tokens > 0
    assert_pool_entirely_free(twin.kv_manager)


@pytest.mark.parametrize("name", ["eagle_tree", "draft_tree"])
def test_trees_shrink_in_large_batches_through_their_own_graphs(models, name):
    """A tree budget (``max_num_batched_draft_tokens`` 18, trees of 9 nodes, topk 3), for an
    EAGLE head and for a draft model: eight requests together draft trees of 4 nodes, grown
    in the 4-node tree graphs; a lone request afterwards drafts the whole 9. Drafts equal the
    eager proposer's (which sizes its host trees the same way), and outputs plain
    decoding's."""
    target, spec = case(models, name)
    spec["tree"]["max_num_batched_draft_tokens"] = 18
    config = dict(speculative_config=json.dumps(spec))
    eager = make_engine(target, **config)
    twin = with_twin_graphs(make_engine(target, **config), max_tokens=48, max_seqs=8)
    assert sorted(twin.proposer.tree_graphs_by_size) == [4, 9]
    eager_drafts, twin_drafts = record_proposals(eager), record_proposals(twin)
    batch, alone = prompts(6), prompts(7)[:1]

    plain = make_engine(target)
    expected = run(plain, batch) + run(plain, alone)
    assert run(eager, batch) + run(eager, alone) == expected
    assert run(twin, batch) + run(twin, alone) == expected
    assert twin_drafts == eager_drafts
    sizes = {len(tokens) for _, tokens, _ in twin_drafts}
    assert 4 in sizes and 9 in sizes and max(sizes) == 9, sizes
    by_size = twin.proposer.tree_graphs_by_size
    assert by_size[4].replays > 0 and by_size[9].replays > 0
    assert twin.scheduler.accepted_draft_tokens > 0
    assert_pool_entirely_free(twin.kv_manager)


@pytest.mark.parametrize("name", ["eagle_tree", "draft_tree"])
def test_the_scheduler_reserves_the_steps_tree_size(models, name):
    """With a tree budget (18 nodes, trees of 9, topk 3), the scheduler reserves each
    decoding sequence the step's tree size, not the full tree: under a 40-token step budget
    all eight sequences decode in one step, each with 4 draft slots (1 + 4 tokens each;
    reserving 9 would fit only four of them), and the proposer grows its trees to exactly the
    reserved size. A lone request still gets 9. Outputs equal plain decoding's, eager and
    through the graphs' CPU twins."""
    target, spec = case(models, name)
    spec["tree"]["max_num_batched_draft_tokens"] = 18
    config = dict(speculative_config=json.dumps(spec), max_num_batched_tokens=40)
    batch, alone = prompts(6), prompts(7)[:1]
    plain = make_engine(target, max_num_batched_tokens=40)
    expected = run(plain, batch) + run(plain, alone)
    for engine in (
        make_engine(target, **config),
        with_twin_graphs(make_engine(target, **config), max_tokens=48, max_seqs=8),
    ):
        steps = []
        propose = engine.proposer.propose

        def recording(scheduled, propose=propose, steps=steps):
            rooms = [s.draft_room for s in scheduled.sequences if s.draft_room]
            proposal = propose(scheduled)
            drafts = proposal.to_host() if isinstance(proposal, DeviceDrafts) else proposal
            steps.append((scheduled.tree_size, rooms, [len(d) for d in drafts.values()]))
            return proposal

        engine.proposer.propose = recording
        assert run(engine, batch) + run(engine, alone) == expected
        assert (4, [4] * 8, [4] * 8) in steps, steps
        assert any(size == 9 and rooms == [9] for size, rooms, _ in steps), steps
        for size, rooms, lengths in steps:
            assert size and max(rooms) <= size and max(lengths, default=0) <= size
        assert engine.scheduler.accepted_draft_tokens > 0
        assert_pool_entirely_free(engine.kv_manager)


def test_a_sequence_with_no_draft_room_does_not_shrink_the_steps_trees(models):
    """A decoding sequence on its last token drafts nothing, so it does not count toward
    the step's trees: two requests beside one with ``max_tokens`` 2 (budget 18, trees of
    9) draft 9 nodes each on that request's last step, as two trees alone would."""
    target, spec = case(models, "eagle_tree")
    spec["tree"]["max_num_batched_draft_tokens"] = 18
    engine = make_engine(target, speculative_config=json.dumps(spec))
    steps = []
    propose = engine.proposer.propose

    def recording(scheduled):
        rooms = [s.draft_room for s in scheduled.sequences if s.num_tokens == 1]
        steps.append((sorted(rooms), scheduled.tree_size))
        return propose(scheduled)

    engine.proposer.propose = recording
    batch = prompts(8)[:3]
    params = [greedy(12, ignore_eos=True)] * 2 + [greedy(2, ignore_eos=True)]
    got = [samples[0] for samples in engine.generate(batch, params)]
    plain = [samples[0] for samples in make_engine(target).generate(batch, params)]
    assert got == plain
    # The short request's last step: three decoding sequences, two with room, 9 slots each.
    assert ([0, 9, 9], 9) in steps, steps


def test_trees_sized_by_the_scheduler_grow_in_their_graphs_when_some_get_no_room(models):
    """Three decoding requests under a 10-token step budget (tree budget 18, trees of 9):
    the scheduler sizes the step's trees for three (4 nodes) but only two fit the step. The
    proposer grows the two at the reserved 4 nodes in the 4-node tree graphs, on the device,
    rather than sizing them for two trees (9 nodes, more than their room, which sends them to
    the host). Outputs equal plain decoding's."""
    target, spec = case(models, "eagle_tree")
    spec["tree"]["max_num_batched_draft_tokens"] = 18
    config = dict(speculative_config=json.dumps(spec), max_num_batched_tokens=10)
    engine = with_twin_graphs(make_engine(target, **config), max_tokens=48, max_seqs=8)
    steps = []
    propose = engine.proposer.propose

    def recording(scheduled):
        rooms = [s.draft_room for s in scheduled.sequences if s.draft_room]
        proposal = propose(scheduled)
        steps.append((len(engine.scheduler.running), rooms, isinstance(proposal, DeviceDrafts)))
        return proposal

    engine.proposer.propose = recording
    batch = [prompt[:3] for prompt in prompts(9)[:3]]  # all three prefilled in one step
    expected = run(make_engine(target, max_num_batched_tokens=10), batch)
    assert run(engine, batch) == expected
    squeezed = [
        on_device for running, rooms, on_device in steps if running == 3 and rooms == [4, 4]
    ]
    assert squeezed and all(squeezed), steps
