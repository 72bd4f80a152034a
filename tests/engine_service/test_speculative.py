"""Speculative decoding on tiny random Llamas: lossless outputs for every kind of request.

Random weights make acceptance rates meaningless, so these tests check what must hold at any
acceptance rate: greedy outputs equal the non-speculative ones token for token (n-gram lookup,
a draft model, chains and trees, with prefix hits, chunked prefill and preemption), runs
committed by sampled verification follow the target's distribution (chains and trees, with
top-k, top-p and min-p), and seeded sampled, penalised and mixed batches on trees get
exactly the tokens plain decoding gives them.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from engine_service.engine import SamplingParams
from engine_service.engine.batch import ScheduledBatch, ScheduledSequence
from engine_service.engine.request import Request
from engine_service.engine.sampler import SamplingMetadata
from engine_service.engine.spec.config import SpeculativeConfig
from engine_service.engine.spec.proposers import NgramProposer, step_tree_size, tree_sizes
from engine_service.engine.spec.verify import verify
from tests.engine_service.helpers import (
    EOS,
    VOCAB,
    assert_pool_entirely_free,
    greedy,
    make_engine,
    make_llama_checkpoint,
    make_request,
    run_all,
    tokens_of,
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


def committed_tokens(verification) -> dict[int, list[int]]:
    """A verification's tokens to commit by sample row, read back as the engine reads them."""
    return verification.read(verification.host_tensors())[0]


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
    committed = committed_tokens(verify(logits.repeat(2 * num, 1), batch, meta, generator))

    first = torch.tensor([committed[i][0] for i in range(num)])
    observed = torch.bincount(first, minlength=vocab).float() / num
    # Six thousand draws: each frequency within about four standard errors.
    assert torch.allclose(observed, target_probs, atol=0.025), observed
    # Accepted drafts carry on with a bonus token; rejected ones stop at the replacement.
    lengths = {len(committed[i]) for i in range(num)}
    assert lengths == {1, 2}


# A tree of five drafts over a six-token vocabulary (node: token):
#     0 ─ 1: 1 ─ 3: 2
#     │        └ 4: 4
#     └ 2: 3 ─ 5: 0
TREE_PARENTS = [0, 0, 1, 1, 2]
TREE_TOKENS = [1, 3, 2, 4, 0]


def reference_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """What plain sampling draws from, written out row by row: temperature, then the top-k
    tokens, the smallest head holding top-p of the mass, and the tokens within min-p of the
    likeliest."""
    out = []
    for row in (logits / params.temperature).softmax(-1).tolist():
        order = sorted(range(len(row)), key=lambda t: -row[t])
        keep = order[: params.top_k] if params.top_k else order
        mass, head = 0.0, []
        for token in keep:
            if mass >= params.top_p:
                break
            head.append(token)
            mass += row[token]
        head = [t for t in head if row[t] >= params.min_p * row[order[0]]]
        kept = [row[t] if t in head else 0.0 for t in range(len(row))]
        out.append([p / sum(kept) for p in kept])
    return torch.tensor(out)


def committed_run_distribution(node_probs: torch.Tensor) -> dict[tuple[int, ...], float]:
    """The exact probability of every run a tree verification can commit, if each token is
    drawn from the target given the run before it: the tokens down the tree while they match
    a child, then the first that does not (or the draw at a leaf)."""
    children = {(p, t): n for n, (p, t) in enumerate(zip(TREE_PARENTS, TREE_TOKENS), start=1)}
    runs: dict[tuple[int, ...], float] = {}

    def visit(node: int, run: tuple[int, ...], mass: float) -> None:
        for token, p in enumerate(node_probs[node].tolist()):
            if p == 0.0:
                continue
            if (node, token) in children:
                visit(children[(node, token)], (*run, token), mass * p)
            else:
                runs[(*run, token)] = mass * p

    visit(0, (), 1.0)
    return runs


@pytest.mark.parametrize("seeded", [False, True], ids=["unseeded", "seeded"])
@pytest.mark.parametrize(
    "truncation",
    [{}, {"temperature": 0.7, "top_k": 3}, {"temperature": 1.3, "top_p": 0.75}, {"min_p": 0.2}],
    ids=["plain", "top-k", "top-p", "min-p"],
)
def test_tree_verification_draws_runs_from_the_targets_distribution(truncation, seeded):
    """Many sequences verify the same drafted tree, each node with its own target
    distribution: the committed runs (down the tree while the draws match a child, then one
    more token) must follow the target's own distribution over runs, truncated by top-k,
    top-p and min-p as plain sampling truncates it; a chi-square test over every run. A
    seeded request draws from its own generator and leaves it where plain decoding would
    after the tokens it committed."""
    vocab, num = 6, 12000
    node_logits = 1.5 * torch.randn(
        len(TREE_TOKENS) + 1, vocab, generator=torch.Generator().manual_seed(3)
    )
    params = {"temperature": 1.0, "max_tokens": 8, **truncation}
    batch = ScheduledBatch()
    size = len(TREE_TOKENS) + 1
    for i in range(num):
        sampling = SamplingParams(seed=i if seeded else None, **params)
        request = Request(f"r{i}", [1, 2, 3], sampling, frozenset({EOS}))
        batch.sequences.append(
            ScheduledSequence(
                request,
                3,
                size,
                num_logits=size,
                draft_token_ids=list(TREE_TOKENS),
                draft_parents=list(TREE_PARENTS),
            )
        )
        batch.sample_rows.append((size * i, request))
        batch.sample_seqs.append(i)
    batch.num_logits = size * num
    meta = SamplingMetadata.build(
        batch.sample_rows, vocab, torch.device("cpu"), num_logits=size * num
    )

    committed = committed_tokens(
        verify(node_logits.repeat(num, 1), batch, meta, torch.Generator().manual_seed(0))
    )

    expected = committed_run_distribution(reference_probs(node_logits, SamplingParams(**params)))
    observed: dict[tuple[int, ...], int] = {}
    for i in range(num):
        run_tokens = tuple(committed[i])
        assert run_tokens in expected, run_tokens  # never a token truncation removed
        observed[run_tokens] = observed.get(run_tokens, 0) + 1
    # Chi-square over the runs, the rare ones (expected count under 5) pooled.
    common = [run for run, p in expected.items() if p * num >= 5]
    cells = [(observed.get(r, 0), expected[r] * num) for r in common]
    rare = num - sum(expected[r] * num for r in common)
    if rare > 0:
        cells.append((num - sum(o for o, _ in cells), rare))
    statistic = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    # Wilson-Hilferty: the chi-square quantile four standard deviations out (p ~ 3e-5).
    bound = df * (1 - 2 / (9 * df) + 4 * (2 / (9 * df)) ** 0.5) ** 3
    assert statistic < bound, (statistic, bound)
    assert max(len(run) for run in observed) == 3  # runs went down to the leaves
    if seeded:
        for i in range(0, num, 997):
            plain = torch.Generator().manual_seed(i)
            for _ in committed[i]:
                torch.empty(vocab).exponential_(generator=plain)
            assert torch.equal(batch.sample_rows[i][1].generator.get_state(), plain.get_state())


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
    committed = committed_tokens(verify(logits, batch, meta, torch.Generator()))

    assert committed == {0: [3, 5, 1]}  # two drafts agreed, the third was replaced


def test_ngram_lookup_takes_the_longest_most_recent_match():
    proposer = NgramProposer(num_tokens=3, lookup_min=1, lookup_max=3)
    assert proposer.lookup([1, 2, 3, 4, 9, 2, 3, 4, 7, 2, 3], 3) == [4, 7, 2]
    assert proposer.lookup([5, 6, 7], 3) == []
    assert proposer.lookup([1, 2, 1], 2) == [2, 1]


def scanned_lookup(tokens: list[int], k: int, lookup_min: int, lookup_max: int) -> list[int]:
    """Prompt lookup by a scan of every earlier window, the longest n first."""
    for n in range(min(lookup_max, len(tokens) - 1), lookup_min - 1, -1):
        tail = tokens[len(tokens) - n :]
        starts = [s for s in range(len(tokens) - n) if tokens[s : s + n] == tail]
        if starts:
            return tokens[starts[-1] + n : starts[-1] + n + k]
    return []


def test_ngram_index_proposes_what_a_scan_does_as_the_sequence_grows():
    """The proposer's per-request index, extended by the tokens appended since the last
    proposal (and across a jump-forward that replaces the newest token), proposes exactly
    what a scan of the whole sequence proposes."""
    rng = random.Random(7)
    for lookup_min, lookup_max in [(1, 3), (2, 4), (1, 1)]:
        proposer = NgramProposer(num_tokens=4, lookup_min=lookup_min, lookup_max=lookup_max)
        request = make_request("r", [rng.randrange(3, 7) for _ in range(5)])
        batch = ScheduledBatch()
        batch.sequences.append(ScheduledSequence(request, 4, 1, 1, draft_room=4))
        proposals = 0
        for _ in range(60):
            tokens = request.all_token_ids
            expected = scanned_lookup(list(tokens), 4, lookup_min, lookup_max)
            assert proposer.propose(batch).get(0, []) == expected, (tokens, lookup_min)
            proposals += bool(expected)
            tokens.extend(rng.randrange(3, 7) for _ in range(rng.randrange(1, 4)))
            if rng.random() < 0.2:
                tokens[-1:] = [rng.randrange(3, 7), rng.randrange(3, 7)]  # jump-forward
        assert proposals > 30


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


@pytest.mark.parametrize("case", ["ngram", "tree_same"])
def test_seeded_sampling_with_speculation_is_reproducible(target, other_draft, case):
    """Two engines give a seeded request the same tokens, and they are the ones it gets
    without speculation: each draw uses the noise of its token's position."""
    spec = json.dumps(SPEC_CASES[case]((target, other_draft)))
    prompt = [5, 6, 7, 5, 6, 7, 5, 6, 7, 5]
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=16, ignore_eos=True)
    first = make_engine(target, speculative_config=spec).generate([prompt], params)
    second = make_engine(target, speculative_config=spec).generate([prompt], params)
    assert first == second == make_engine(target).generate([prompt], params)


MIXED_PARAMS = {
    "greedy": greedy(24, ignore_eos=True),
    "greedy-penalised": greedy(24, ignore_eos=True, repetition_penalty=1.2),
    "seeded": SamplingParams(temperature=0.5, seed=3, max_tokens=24, ignore_eos=True),
    "truncated": SamplingParams(
        temperature=1.0, top_k=12, top_p=0.9, min_p=0.02, seed=4, max_tokens=24, ignore_eos=True
    ),
    "pair": SamplingParams(n=2, temperature=0.7, seed=5, max_tokens=24, ignore_eos=True),
    "penalised": SamplingParams(
        temperature=0.6,
        seed=6,
        frequency_penalty=0.3,
        presence_penalty=0.2,
        repetition_penalty=1.1,
        max_tokens=24,
        ignore_eos=True,
    ),
    "unseeded": SamplingParams(temperature=0.9, max_tokens=24, ignore_eos=True),
}


@pytest.mark.parametrize("case", ["tree_same", "tree_other", "draft_same", "draft_other"])
def test_greedy_and_sampled_requests_verify_in_the_same_steps_and_equal_plain_decoding(
    target, near_draft, case
):
    """Greedy, seeded sampled (temperature, top-k, top-p, min-p, n = 2) and penalised
    requests in one batch, all verifying trees when a tree is configured (chains otherwise):
    every request but the unseeded one gets exactly its tokens without speculation, token
    for token, whatever was drafted and accepted (the target as its own draft is often
    accepted, a perturbed copy mostly rejected)."""
    spec = json.dumps(SPEC_CASES[case]((target, near_draft)))
    prompts = repetitive_prompts(random.Random(6))

    def outputs(engine):
        for i, (name, params) in enumerate(MIXED_PARAMS.items()):
            engine.add_request(name, prompts[i % len(prompts)], params)
        return {key: tokens_of(out) for key, out in run_all(engine).items()}

    speculative = make_engine(target, speculative_config=spec)
    got, expected = outputs(speculative), outputs(make_engine(target))

    unseeded = [key for key in got if key[0] == "unseeded"]
    assert [len(got[key]) for key in unseeded] == [24]
    for key in unseeded:
        del got[key], expected[key]
    assert got == expected
    scheduler = speculative.scheduler
    assert scheduler.num_drafts > 0
    if case.endswith("same"):
        assert scheduler.accepted_draft_tokens > 0
    if case == "tree_same":
        assert scheduler.tree_tokens_moved > 0
    assert_pool_entirely_free(speculative.kv_manager)


def test_sampled_requests_accept_tree_drafts(target):
    """Sampled requests alone, drafted by the target itself: their trees are verified and
    accepted (off the first child too, whichever the draw matched), more tokens a round
    than a chain of the same depth gets."""
    params = SamplingParams(temperature=0.5, seed=8, max_tokens=24, ignore_eos=True)
    prompts = repetitive_prompts(random.Random(6))

    def accepted_per_round(tree: bool) -> float:
        spec = {"model": str(target), "num_speculative_tokens": 3}
        if tree:
            spec["tree"] = {"topk": 3, "num_draft_tokens": 9}
        engine = make_engine(target, speculative_config=json.dumps(spec))
        assert engine.generate(prompts, params) == make_engine(target).generate(prompts, params)
        if tree:
            assert engine.scheduler.tree_tokens_moved > 0
        return engine.scheduler.accepted_draft_tokens / engine.scheduler.num_drafts

    assert accepted_per_round(True) > accepted_per_round(False) > 0


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
        (
            '{"model": "x", "num_speculative_tokens": 2, "tree": {"topk": 2, '
            '"num_draft_tokens": 8, "max_num_batched_draft_tokens": 4}}',
            "at least num_draft_tokens",
        ),
        (
            '{"model": "x", "num_speculative_tokens": 2, "tree": {"topk": 2, '
            '"num_draft_tokens": 8, "width": 3}}',
            "optionally",
        ),
    ],
)
def test_bad_speculative_configs_are_refused_naming_the_problem(config, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.parse(config)


def test_a_tree_budget_shrinks_trees_only_past_it():
    """``max_num_batched_draft_tokens``: trees keep their size while the step's trees fit
    the budget together, then share it over the next power of two of trees, down to
    ``topk + 1`` nodes."""
    spec = SpeculativeConfig.parse(
        {
            "model": "x",
            "num_speculative_tokens": 6,
            "tree": {"topk": 2, "num_draft_tokens": 12, "max_num_batched_draft_tokens": 128},
        }
    )
    assert spec.tree_batch_tokens == 128

    class Proposer:
        tree_topk, tree_size, tree_batch_tokens = 2, 12, 128

    sizes = {n: step_tree_size(Proposer, n) for n in (1, 8, 10, 11, 16, 17, 32, 64, 200)}
    assert sizes == {1: 12, 8: 12, 10: 12, 11: 8, 16: 8, 17: 4, 32: 4, 64: 3, 200: 3}
    assert tree_sizes(Proposer, 64) == [12, 8, 4, 3]
    Proposer.tree_batch_tokens = 0  # no budget: one size
    assert step_tree_size(Proposer, 200) == 12 and tree_sizes(Proposer, 64) == [12]


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
    host_moves: list = []
    move_slots = engine.runner.move_slots
    engine.runner.move_slots = lambda copies: (host_moves.append(copies), move_slots(copies))
    prompts = repetitive_prompts(random.Random(9))

    assert run(engine, prompts, 32) == run(make_engine(target), prompts, 32)
    assert engine.scheduler.tree_tokens_moved > 0
    assert not host_moves  # one rank: packed on the device, the host queues no moves
    assert_pool_entirely_free(engine.kv_manager)


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_samples_forking_from_a_one_token_last_chunk_do_not_draft_there(target, near_draft, tree):
    """A prompt whose last chunk is one token, with n = 2: its samples fork from that row,
    so the step drafts nothing there (drafts there would be verified once per sample on the
    same slots, and both runs committed to the first sample: duplicated tokens, and the
    other sample never finished). Both samples equal plain decoding's, and speculation
    resumes once they have forked."""
    spec = {"model": str(near_draft), "num_speculative_tokens": 3}
    if tree:
        spec["tree"] = {"topk": 3, "num_draft_tokens": 9}
    rng = random.Random(3)
    prompt = [rng.randrange(3, VOCAB) for _ in range(17)]  # a chunk of 16, then one token
    params = SamplingParams(n=2, temperature=0.0, max_tokens=12, ignore_eos=True)

    def samples(engine) -> dict[int, list[int]]:
        engine.add_request("forks", prompt, params)
        outputs: dict[int, list] = {}
        for _ in range(100):
            if not engine.has_unfinished():
                break
            for output in engine.step():
                outputs.setdefault(output.index, []).append(output)
        assert not engine.has_unfinished()
        return {index: tokens_of(got) for index, got in outputs.items()}

    speculative = make_engine(
        target, max_num_batched_tokens=16, speculative_config=json.dumps(spec)
    )
    got = samples(speculative)

    assert got == samples(make_engine(target, max_num_batched_tokens=16))
    assert len(got) == 2 and all(len(tokens) == 12 for tokens in got.values())
    assert speculative.scheduler.num_drafts > 0
    assert_pool_entirely_free(speculative.kv_manager)


@pytest.mark.parametrize("prompt_length", [1, 9])
@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_samples_forking_beside_verified_drafts_get_their_own_tokens(
    target, other_draft, tree, prompt_length
):
    """A prompt of n = 2 samples ending in a step where another request verifies drafts:
    each sample's first token is its own (the second sample's went to the first, which
    got it twice, and the second never finished). Outputs equal plain decoding's."""
    spec = {"model": str(other_draft), "num_speculative_tokens": 2}
    if tree:
        spec["tree"] = {"topk": 2, "num_draft_tokens": 4}
    second = [255, 29, 280, 59, 188, 79, 197, 287, 237][:prompt_length]

    def outputs(engine) -> dict[tuple[str, int], list[int]]:
        engine.add_request("a", [175, 152] * 4, greedy(11, ignore_eos=True))
        got: dict[tuple[str, int], list[int]] = {}
        for step in range(100):
            for output in engine.step():
                key = (output.request_id, output.index)
                got.setdefault(key, []).extend(output.new_token_ids)
            if step == 0:  # arrives while "a" decodes (with drafts, when speculating)
                engine.add_request("b", second, greedy(10, n=2, ignore_eos=True))
            if not engine.has_unfinished():
                break
        assert not engine.has_unfinished()
        return got

    speculative = make_engine(target, speculative_config=json.dumps(spec))
    got = outputs(speculative)

    assert got == outputs(make_engine(target))
    assert {len(tokens) for key, tokens in got.items() if key[0] == "b"} == {10}
    assert speculative.scheduler.num_drafts > 0
    assert_pool_entirely_free(speculative.kv_manager)


@pytest.mark.parametrize("draft", ["near", "self"])
def test_tree_paths_packed_on_the_device_equal_the_hosts_moves(target, near_draft, draft):
    """The accepted paths' KV is packed on the device right after verification
    (``move_accepted_paths``). Told the device did not pack, the scheduler lists the host's
    moves (``take_slot_copies``, what ``move_slots`` does where the KV is on several ranks).
    Applied to the cache as it was before the device's packing, they give the same KV at every committed slot of every running
    request, round after round, for trees of different sizes in one batch: paths through
    later branches (``near``: a perturbed draft) and paths the trees' whole depth deep
    (``self``: the target drafting for itself, whose first branch is always accepted and
    whose nodes at depth two and more are numbered past their path position)."""
    depth = 3
    spec = json.dumps(
        {
            "model": str(near_draft if draft == "near" else target),
            "num_speculative_tokens": depth,
            "tree": {"topk": 4, "num_draft_tokens": 12},
        }
    )
    engine = make_engine(target, speculative_config=spec)
    runner, kv = engine.runner, engine.kv_manager
    before: list[torch.Tensor] = []
    checked = {"rounds": 0, "moves": 0, "sizes": set(), "deepest": 0}
    pack, take = runner.move_accepted_paths, kv.take_slot_copies

    def packing(verification, inputs, max_depth):
        if verification.path is None:  # chains only (trees cut to one branch): no moves
            assert not pack(verification, inputs, max_depth)
            return False
        before.append(runner.kv_cache.clone())
        checked["sizes"].add(tuple(verification.trees.sizes))
        checked["deepest"] = max(checked["deepest"], int(verification.count.max()))
        assert pack(verification, inputs, max_depth)
        verification.moved_on_device = False  # so that the scheduler lists the host's moves
        return True

    def taking():
        moves = take()
        if before:
            expected = before.pop()
            size = runner.block_size
            copies = [expected[src // size, :, :, src % size].clone() for src, _ in moves]
            for (_, dst), copied in zip(moves, copies):
                expected[dst // size, :, :, dst % size] = copied
            for request in engine.scheduler.running:
                for index in range(request.num_computed_tokens):
                    slot = request.block_table[index // size] * size + index % size
                    assert torch.equal(
                        runner.kv_cache[slot // size, :, :, slot % size],
                        expected[slot // size, :, :, slot % size],
                    )
            checked["rounds"] += 1
            checked["moves"] += len(moves)
            return []  # packed on the device already
        return moves

    runner.move_accepted_paths, kv.take_slot_copies = packing, taking
    prompts = repetitive_prompts(random.Random(9))

    assert run(engine, prompts, 32) == run(make_engine(target), prompts, 32)
    assert checked["rounds"] > 10 and checked["moves"] > 0
    assert any(len(set(sizes)) > 1 for sizes in checked["sizes"])
    if draft == "self":
        assert checked["deepest"] == depth


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
