"""Multi-LoRA in the engine core, against ``transformers`` with the PEFT adapter merged.

Two adapters made with ``peft`` on a small random Qwen2 checkpoint (stacked qkv and gate_up
layers, biases): ``wide`` of rank 4 on every projection, ``narrow`` of rank 8 with rsLoRA
scaling on three of them. Their B matrices are random (PEFT starts them at zero, which would
make every adapter the base model), so a missing or misplaced delta changes the tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from engine_service.engine import EngineConfig, LLMEngine, SamplingParams
from engine_service.engine.lora_manager import UnknownAdapterError
from tests.engine_service.conftest import make_checkpoint
from tests.lora_support import make_peft_adapter, merged_model

MAX_NEW = 8
LOGPROB_TOL = 2e-3
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "wide": dict(r=4, lora_alpha=8, target_modules=ALL_PROJECTIONS),
    "narrow": dict(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True
    ),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint path, {adapter name: folder}, {None or adapter name: merged model})."""
    root = tmp_path_factory.mktemp("lora")
    base = make_checkpoint(root / "base", "qwen2")
    folders = {}
    models = {None: base}
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        folders[name] = root / name
        make_peft_adapter(base, folders[name], seed, **config)
        models[name] = merged_model(base, folders[name])
    return root / "base", folders, models


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(3)
    shared = [rng.randrange(3, vocab) for _ in range(20)]
    return [shared, [*shared[:16], *(rng.randrange(3, vocab) for _ in range(7))], [5, 9, 11]]


def _reference(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=MAX_NEW,
            min_new_tokens=MAX_NEW,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [
        torch.log_softmax(step[0].float(), -1)[tok].item() for step, tok in zip(out.logits, tokens)
    ]
    return tokens, logprobs


def _engine(setup, **settings) -> LLMEngine:
    path, folders, _ = setup
    config = dict(
        model=str(path),
        dtype="float32",
        num_kv_blocks=128,
        block_size=4,
        enable_lora=True,
        max_loras=2,
        max_lora_rank=8,
        lora_modules=tuple((name, str(folder)) for name, folder in folders.items()),
    )
    return LLMEngine(EngineConfig(**{**config, **settings}))


def _run(engine: LLMEngine, jobs: list[tuple[list[int], str | None]]):
    """Run every (prompt, adapter) in one batch; (tokens, logprobs) per job, in order."""
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, logprobs=0)
    ids = [f"job-{i}-{id(jobs)}" for i in range(len(jobs))]
    for rid, (prompt, adapter) in zip(ids, jobs):
        engine.add_request(rid, prompt, params, adapter=adapter)
    tokens = {rid: [] for rid in ids}
    logprobs = {rid: [] for rid in ids}
    cached = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            logprobs[out.request_id].extend(lp.logprob for lp in out.new_logprobs or [])
            if out.finished:
                cached[out.request_id] = out.num_cached_tokens
    return [(tokens[r], logprobs[r], cached[r]) for r in ids]


def _assert_matches(got, expected, what):
    tokens, logprobs, _ = got
    want_tokens, want_logprobs = expected
    assert tokens == want_tokens, what
    assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs)) < LOGPROB_TOL, what


def test_the_adapters_change_the_output(setup):
    """Guards the parity tests below: each adapter really moves the greedy tokens."""
    _, _, models = setup
    prompt = _prompts(models[None].config.vocab_size)[0]
    outputs = {name: _reference(model, prompt)[0] for name, model in models.items()}
    assert len({tuple(v) for v in outputs.values()}) == 3, outputs


@pytest.mark.parametrize("adapter", [None, "wide", "narrow"])
def test_each_adapter_alone_matches_transformers_with_it_merged(setup, adapter):
    _, _, models = setup
    prompts = _prompts(models[None].config.vocab_size)
    engine = _engine(setup, enable_prefix_caching=False)
    results = _run(engine, [(p, adapter) for p in prompts])
    for prompt, got in zip(prompts, results):
        _assert_matches(got, _reference(models[adapter], prompt), (adapter, prompt))


@pytest.mark.parametrize("path", ["dense", "grouped"])
def test_a_batch_mixing_adapters_and_the_base_gives_each_what_it_gets_alone(
    setup, path, monkeypatch
):
    """One batch holds every (prompt, adapter) pair, prefix cache on and a token budget
    small enough that prefill chunks and decodes of different adapters share steps; both
    of the torch deltas' ways (all slots masked, or tokens grouped by adapter)."""
    import engine_service.layers.lora as lora_layers

    monkeypatch.setattr(lora_layers, "DENSE_MAX_COLUMNS", 512 if path == "dense" else 0)
    _, _, models = setup
    prompts = _prompts(models[None].config.vocab_size)
    jobs = [(p, a) for p in prompts for a in (None, "wide", "narrow")]
    engine = _engine(setup, max_num_batched_tokens=16)
    assert all(d.dense == (path == "dense") for d in engine.lora.deltas.values())
    results = _run(engine, jobs)
    for (prompt, adapter), got in zip(jobs, results):
        _assert_matches(got, _reference(models[adapter], prompt), (adapter, prompt))


def test_the_same_prompt_under_two_adapters_never_shares_cached_blocks(setup):
    _, _, models = setup
    prompt = _prompts(models[None].config.vocab_size)[0]
    engine = _engine(setup)
    first = _run(engine, [(prompt, "wide")])[0]
    assert first[2] == 0
    # Another adapter, then the base model: no hit on "wide"'s blocks, right outputs.
    for adapter in ("narrow", None):
        got = _run(engine, [(prompt, adapter)])[0]
        assert got[2] == 0, f"{adapter} hit blocks cached under another adapter"
        _assert_matches(got, _reference(models[adapter], prompt), adapter)
    # The same adapter again does hit its own blocks.
    again = _run(engine, [(prompt, "wide")])[0]
    assert again[2] > 0
    _assert_matches(again, _reference(models["wide"], prompt), "wide again")


def test_block_keys_follow_adapter_content_not_name(setup, tmp_path):
    """Two names for the same files share a fingerprint; new weights under an old name get
    a new one (so KV cached for the old weights is never served for the new)."""
    _, folders, _ = setup
    engine = _engine(setup, max_loras=3)
    engine.add_lora("wide-copy", str(folders["wide"]))
    lora = engine.lora
    assert lora.get("wide-copy").cache_key == lora.get("wide").cache_key
    assert lora.get("narrow").cache_key != lora.get("wide").cache_key
    before = lora.get("wide").cache_key
    engine.add_lora("wide", str(folders["narrow"]), replace=True)
    assert lora.get("wide").cache_key == lora.get("narrow").cache_key != before


def test_more_adapters_than_device_slots_wait_and_all_finish_correctly(setup):
    """With one device slot and one host-cache entry, requests of the other adapter wait
    aside (its files are read again off the engine thread meanwhile), then run."""
    _, _, models = setup
    prompt = _prompts(models[None].config.vocab_size)[2]
    engine = _engine(setup, max_loras=1, max_cpu_loras=1)
    jobs = [(prompt, "wide"), (prompt, "narrow"), (prompt, None), (prompt, "wide")]
    for (_, adapter), got in zip(jobs, _run(engine, jobs)):
        _assert_matches(got, _reference(models[adapter], prompt), adapter)
    # One write per adapter: the second "wide" request shared the first one's slot.
    assert engine.lora.loads_total == 2
    # The adapter neither in the slot nor in host memory is read from its folder again.
    lora = engine.lora
    (evicted,) = [n for n, a in lora.adapters.items() if a.weights is None]
    assert evicted not in lora.resident()
    got = _run(engine, [(prompt, evicted)])[0]
    _assert_matches(got, _reference(models[evicted], prompt), f"{evicted} read again")
    assert lora.loads_total == 3 and lora.resident() == [evicted]


def test_an_adapter_changed_on_disk_since_it_was_loaded_fails_its_requests_only(setup, tmp_path):
    """Evicted from host memory, an adapter is read again; other weights than were loaded
    (same path) end its requests with "abort", and the engine keeps serving."""
    _, folders, models = setup
    copy = _copy_adapter(folders["narrow"], tmp_path / "narrow-copy")
    engine = _engine(setup, max_loras=1, max_cpu_loras=1)
    engine.add_lora("copy", str(copy))  # evicts "narrow" from the one-entry host cache...
    engine.add_lora("last", str(folders["wide"]))  # ...and this one evicts "copy"
    (copy / "adapter_model.safetensors").write_bytes(
        (folders["wide"] / "adapter_model.safetensors").read_bytes()
    )
    params = SamplingParams(max_tokens=2, temperature=0.0)
    engine.add_request("changed", [5, 9, 11], params, adapter="copy")
    finishes = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finishes[out.request_id] = out.finish_reason
    assert finishes == {"changed": "abort"}
    prompt = [5, 9, 11]
    _assert_matches(_run(engine, [(prompt, "wide")])[0], _reference(models["wide"], prompt), "ok")


def test_steps_without_adapters_leave_the_slots_unset(setup):
    engine = _engine(setup)
    _run(engine, [([5, 6, 7], None)])
    assert engine.lora.slots.token_slots is None


def _copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(folder: Path, **changes) -> None:
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("rank", "exceeds --max-lora-rank"),
        ("target", "not adaptable layers of this model"),
        ("no-config", "has no adapter_config.json"),
        ("no-weights", "has no adapter_model.safetensors"),
        ("corrupt-weights", "is corrupt"),
        ("corrupt-config", "is not valid JSON"),
        ("missing-folder", "cannot find"),
        ("wrong-shape", "has shape"),
    ],
)
def test_bad_adapters_are_refused_with_the_reason_and_disturb_nothing(
    setup, tmp_path, breakage, message
):
    _, folders, models = setup
    engine = _engine(setup, max_lora_rank=8)
    bad = _copy_adapter(folders["wide"], tmp_path / "bad")
    if breakage == "rank":
        bad = _copy_adapter(folders["narrow"], tmp_path / "big")
        engine = _engine(setup, max_lora_rank=4, lora_modules=(("wide", str(folders["wide"])),))
    elif breakage == "target":
        _edit_config(bad, target_modules=["q_proj", "fc_in"])
    elif breakage == "no-config":
        (bad / "adapter_config.json").unlink()
    elif breakage == "no-weights":
        (bad / "adapter_model.safetensors").unlink()
    elif breakage == "corrupt-weights":
        (bad / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00not safetensors")
    elif breakage == "corrupt-config":
        (bad / "adapter_config.json").write_text("{r: 4")
    elif breakage == "missing-folder":
        bad = tmp_path / "nowhere"
    elif breakage == "wrong-shape":
        _edit_config(bad, r=2, lora_alpha=4)
    with pytest.raises(ValueError, match=message):
        engine.add_lora("bad", str(bad))
    assert "bad" not in engine.lora.adapters
    prompt = [5, 9, 11]
    _assert_matches(
        _run(engine, [(prompt, "wide")])[0], _reference(models["wide"], prompt), "after"
    )


def test_unknown_or_disabled_adapters_are_refused_at_add_request(setup):
    engine = _engine(setup)
    params = SamplingParams(max_tokens=2)
    with pytest.raises(UnknownAdapterError, match="not loaded"):
        engine.add_request("a", [5, 6], params, adapter="nope")
    path, _, _ = setup
    plain = LLMEngine(EngineConfig(model=str(path), dtype="float32", num_kv_blocks=16))
    with pytest.raises(ValueError, match="not enabled"):
        plain.add_request("a", [5, 6], params, adapter="wide")


def test_an_unloaded_adapter_takes_no_new_requests(setup):
    engine = _engine(setup)
    engine.remove_lora("narrow")
    with pytest.raises(UnknownAdapterError):
        engine.add_request("a", [5, 6], SamplingParams(max_tokens=2), adapter="narrow")
    with pytest.raises(UnknownAdapterError):
        engine.remove_lora("narrow")


def _twin_graphs(engine):
    """Installs the CPU twin of step graphs on ``engine``; returns the live slots of every
    replayed step."""
    from engine_service.engine.cuda_graphs import StepGraphs

    graphs = StepGraphs(engine.runner, max_tokens=16, max_seqs=8, capture=False, mixed=True)
    engine.runner.graphs = graphs
    replays = []
    replay = graphs.replay
    graphs.replay = lambda ids, inputs: (
        replays.append(inputs.lora_token_slots) or replay(ids, inputs)
    )
    return replays


def test_steps_with_adapters_replay_step_graphs(setup):
    """The deltas of the dense torch path (and the Triton kernels) read no device data on the
    host, so step graphs carry them, the slots in a static buffer padded with -1: steps
    holding adapters replay graphs (here their CPU twin) beside base-only steps, and every
    request still gets its own adapter's answer."""
    _, _, models = setup
    engine = _engine(setup, max_num_batched_tokens=16)
    assert engine.lora.slots.graph_safe
    replays = _twin_graphs(engine)
    prompt = [5, 9, 11]
    jobs = [(prompt, None), (prompt, "wide"), ([7, 8], "narrow"), ([7, 8], None)]
    for (p, adapter), got in zip(jobs, _run(engine, jobs)):
        _assert_matches(got, _reference(models[adapter], p), adapter)
    base_only = _run(engine, [([4, 4, 4], None)])[0]
    _assert_matches(base_only, _reference(models[None], [4, 4, 4]), "base")
    assert any(slots is not None for slots in replays)
    assert any(slots is None for slots in replays)


def test_base_only_steps_replay_graphs_without_the_deltas(setup, monkeypatch):
    """With LoRA on, every shape is captured twice: base-only steps replay the variant
    without deltas, so they do no LoRA work at all (here: no dense delta runs while they
    replay), and steps holding an adapter still get it."""
    from engine_service.layers.lora import TorchLoRA

    _, _, models = setup
    engine = _engine(setup, max_num_batched_tokens=16)
    replays = _twin_graphs(engine)
    calls = []
    dense = TorchLoRA._add_dense
    monkeypatch.setattr(
        TorchLoRA,
        "_add_dense",
        lambda self, x, y: calls.append(replays[-1] is not None) or dense(self, x, y),
    )
    base_only = _run(engine, [([4, 4, 4], None)])[0]
    _assert_matches(base_only, _reference(models[None], [4, 4, 4]), "base")
    assert replays and all(slots is None for slots in replays)
    assert calls == []
    adapted = _run(engine, [([4, 4, 4], "wide")])[0]
    _assert_matches(adapted, _reference(models["wide"], [4, 4, 4]), "wide")
    assert calls and all(calls)


def test_steps_with_adapters_run_eagerly_when_the_deltas_sync(setup, monkeypatch):
    """The grouped torch path reads the step's adapters on the host, so a graph cannot carry
    it: steps holding an adapter run eagerly, base-only steps may still replay."""
    import engine_service.layers.lora as lora_layers

    monkeypatch.setattr(lora_layers, "DENSE_MAX_COLUMNS", 0)
    _, _, models = setup
    engine = _engine(setup, max_num_batched_tokens=16)
    assert not engine.lora.slots.graph_safe
    replays = _twin_graphs(engine)
    prompt = [5, 9, 11]
    jobs = [(prompt, None), (prompt, "wide"), ([7, 8], None)]
    for (p, adapter), got in zip(jobs, _run(engine, jobs)):
        _assert_matches(got, _reference(models[adapter], p), adapter)
    base_only = _run(engine, [([4, 4, 4], None)])[0]
    _assert_matches(base_only, _reference(models[None], [4, 4, 4]), "base")
    assert replays and all(slots is None for slots in replays)


def test_parallel_samples_and_preemption_keep_their_adapter(setup):
    """n=2 samples forked from an adapter's prompt, in a pool so small that sequences are
    preempted and recomputed: every sample still decodes with its adapter."""
    _, _, models = setup
    prompts = _prompts(models[None].config.vocab_size)
    engine = _engine(setup, num_kv_blocks=14, max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, n=2)
    jobs = {"p0": (prompts[0], "narrow"), "p1": (prompts[1], "wide"), "p2": (prompts[0], None)}
    for rid, (prompt, adapter) in jobs.items():
        engine.add_request(rid, prompt, params, adapter=adapter)
    tokens = {(rid, i): [] for rid in jobs for i in range(2)}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[(out.request_id, out.index)].extend(out.new_token_ids)
    assert engine.stats().num_preemptions > 0
    for (rid, _), got in tokens.items():
        prompt, adapter = jobs[rid]
        assert got == _reference(models[adapter], prompt)[0], (rid, adapter)
    assert all(slot.users == 0 for slot in engine.lora._slots)


def test_aborting_frees_the_slot_for_a_waiting_adapter(setup):
    _, _, models = setup
    engine = _engine(setup, max_loras=1, max_cpu_loras=2)  # both in host memory
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    engine.add_request("long", [5, 9, 11], params, adapter="wide")
    engine.add_request("waits", [5, 9, 11], params, adapter="narrow")
    engine.step()
    assert engine.stats().lora.waiting == ("narrow",)
    assert engine.stats().lora.running == ("wide",)
    engine.abort("long")
    engine.step()
    engine.step()
    assert engine.stats().lora.running == ("narrow",)  # it took the freed slot
    engine.abort("waits")
    while engine.has_unfinished():
        engine.step()
    assert all(slot.users == 0 for slot in engine.lora._slots)
    prompt = [5, 9, 11]
    _assert_matches(_run(engine, [(prompt, "wide")])[0], _reference(models["wide"], prompt), "ok")


@pytest.mark.parametrize(
    "spec",
    [
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1},
        {"model": "BASE", "num_speculative_tokens": 2, "tree": {"topk": 2, "num_draft_tokens": 4}},
    ],
    ids=["ngram", "base-as-draft-tree"],
)
def test_speculation_with_adapters_matches_transformers_with_them_merged(setup, spec):
    """Drafts come from the base model (or the prompt), verification runs with each
    sequence's adapter: outputs stay each adapter's own."""
    import json

    path, _, models = setup
    spec = {**spec, **({"model": str(path)} if spec.get("model") == "BASE" else {})}
    prompts = _prompts(models[None].config.vocab_size)
    jobs = [(p, a) for p in prompts for a in (None, "wide", "narrow")]
    engine = _engine(setup, speculative_config=json.dumps(spec))
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    ids = [f"spec-{i}" for i in range(len(jobs))]
    for rid, (prompt, adapter) in zip(ids, jobs):
        engine.add_request(rid, prompt, params, adapter=adapter)
    tokens = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    for rid, (prompt, adapter) in zip(ids, jobs):
        assert tokens[rid] == _reference(models[adapter], prompt)[0], (adapter, prompt)
    assert engine.scheduler.num_drafts > 0


# -- tensor parallelism ---------------------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads", [2, 1], ids=["kv-split", "kv-replicated"])
def test_each_rank_holds_the_slice_of_an_adapter_that_its_weights_hold(num_kv_heads):
    """Column layers (a stacked q/k/v here) keep A whole and, of each piece's B, the rows
    their base weight keeps (key/value heads fewer than the ranks: both hold the same ones);
    row layers keep A's columns of their input slice and B whole. Two ranks' results then
    equal one rank's: side by side for the column layer, summed for the row layer, which is
    the all-reduce its base result takes anyway, so the delta costs no communication."""
    from torch import nn

    from engine_service.engine.lora_manager import (
        LoRAAdapter,
        apply_slot_write,
        attach_adapter_slots,
        make_slot_write,
    )
    from engine_service.layers.linear import QKVParallelLinear, RowParallelLinear
    from engine_service.layers.parallel import SINGLE, TensorParallel

    hidden, head_dim, heads, rank = 32, 8, 4, 3
    g = torch.Generator().manual_seed(0)
    sizes = {"q": heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim}
    base = {s: torch.randn(n, hidden, generator=g) for s, n in sizes.items()}
    base_o = torch.randn(hidden, heads * head_dim, generator=g)
    pairs = {
        ("qkv_proj", s): (torch.randn(rank, hidden, generator=g), torch.randn(n, rank, generator=g))
        for s, n in sizes.items()
    }
    pairs[("o_proj", None)] = (
        torch.randn(rank, heads * head_dim, generator=g),
        torch.randn(hidden, rank, generator=g),
    )
    adapter = LoRAAdapter("a", Path("."), ".", rank, 1.0, [], "", weights=pairs)
    token_slots = torch.tensor([1, -1, 1, 1, -1])  # base-model tokens among the adapter's

    def layers(tp: TensorParallel) -> nn.Module:
        net = nn.Module()
        net.qkv_proj = QKVParallelLinear(hidden, head_dim, heads, num_kv_heads, tp=tp)
        net.o_proj = RowParallelLinear(heads * head_dim, hidden, tp=tp)
        for shard, weight in base.items():
            net.qkv_proj.weight_loader(net.qkv_proj.weight, weight, shard)
        net.o_proj.weight_loader(net.o_proj.weight, base_o)
        slots, deltas = attach_adapter_slots(net, max_loras=2, max_rank=4)
        apply_slot_write(deltas, make_slot_write(deltas, 1, adapter))
        slots.set(token_slots)
        return net

    x = torch.randn(5, hidden, generator=g)
    z = torch.randn(5, heads * head_dim, generator=g)
    one = layers(SINGLE)
    qkv, o = one.qkv_proj.local_forward(x), one.o_proj.local_forward(z)
    plain = x @ torch.cat(list(base.values())).T
    assert not torch.allclose(qkv[0], plain[0]) and torch.allclose(qkv[1], plain[1])
    per_rank = z.shape[1] // 2
    o_sum = torch.zeros_like(o)
    for r in range(2):
        part = layers(TensorParallel(r, 2))
        local = part.qkv_proj.local_forward(x)
        for shard_id, shard in part.qkv_proj.shards.items():
            whole = one.qkv_proj.shards[shard_id].offset + shard.source_start
            torch.testing.assert_close(
                local[:, shard.offset : shard.offset + shard.size],
                qkv[:, whole : whole + shard.size],
            )
        o_sum += part.o_proj.local_forward(z[:, r * per_rank : (r + 1) * per_rank])
    torch.testing.assert_close(o_sum, o)


def test_two_tensor_parallel_ranks_serve_adapters_as_one_rank_does(setup, tmp_path):
    """TP=2 over gloo (this process is rank 0, rank 1 a child): a batch mixing both adapters
    (ranks 4 and 8) and the base model, prefills chunked, gives one rank's tokens and
    logprobs, which are transformers' with each adapter merged. ``narrow`` is loaded at
    runtime, and ``wide`` reloaded in place with other weights: rank 0's slot writes and
    clears reach rank 1. An adapter on the vocabulary-parallel head is refused at load."""
    _, folders, models = setup
    prompts = _prompts(models[None].config.vocab_size)
    jobs = [(p, a) for p in prompts for a in (None, "wide", "narrow")]
    single = _run(_engine(setup, max_num_batched_tokens=16), jobs)
    head = make_peft_adapter(
        models[None], tmp_path / "head", 5, r=2, lora_alpha=4, target_modules=["lm_head"]
    )
    engine = _engine(
        setup,
        max_num_batched_tokens=16,
        tensor_parallel_size=2,
        lora_modules=(("wide", str(folders["wide"])),),
    )
    try:
        engine.add_lora("narrow", str(folders["narrow"]))
        parallel = _run(engine, jobs)
        engine.add_lora("wide", str(folders["narrow"]), replace=True)
        replaced = _run(engine, [(prompts[2], "wide"), (prompts[2], None)])
        with pytest.raises(ValueError, match=r"\['lm_head'\] are not adaptable layers"):
            engine.add_lora("head", str(head))
        assert "head" not in engine.lora.adapters
    finally:
        engine.close()
    for (prompt, adapter), got, alone in zip(jobs, parallel, single):
        assert got[0] == alone[0], (adapter, prompt)
        assert max(abs(a - b) for a, b in zip(got[1], alone[1])) < 1e-4, (adapter, prompt)
        _assert_matches(got, _reference(models[adapter], prompt), (adapter, prompt))
    _assert_matches(replaced[0], _reference(models["narrow"], prompts[2]), "wide replaced")
    _assert_matches(replaced[1], _reference(models[None], prompts[2]), "base")


def test_two_data_parallel_ranks_serve_adapters_as_one_rank_does(setup):
    """DP=2 over gloo: each rank holds the whole model and every adapter slot (rank 0's
    writes repeat on rank 1), adapter requests go to either rank, and a mixed batch gives one
    rank's tokens, transformers' with each adapter merged; ``narrow`` is loaded at runtime."""
    _, folders, models = setup
    prompts = _prompts(models[None].config.vocab_size)
    jobs = [(p, a) for p in prompts for a in (None, "wide", "narrow")]
    single = _run(_engine(setup, max_num_batched_tokens=16), jobs)
    engine = _engine(
        setup,
        max_num_batched_tokens=16,
        data_parallel_size=2,
        lora_modules=(("wide", str(folders["wide"])),),
    )
    try:
        engine.add_lora("narrow", str(folders["narrow"]))
        scheduler = engine._shards[1].scheduler
        on_rank_1: list[int] = []
        add = scheduler.add
        scheduler.add = lambda request: on_rank_1.append(request.adapter_slot) or add(request)
        parallel = _run(engine, jobs)
    finally:
        engine.close()
    assert len(set(on_rank_1) - {0}) == 2  # both adapters ran on rank 1
    for (prompt, adapter), got, alone in zip(jobs, parallel, single):
        assert got[0] == alone[0], (adapter, prompt)
        _assert_matches(got, _reference(models[adapter], prompt), (adapter, prompt))
