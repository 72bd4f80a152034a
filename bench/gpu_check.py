"""GPU check of the Triton kernels and CUDA graphs against the SDPA reference path.

Runs on a CUDA machine (CI has none), in two parts; exit status 1 on any mismatch.

- Kernel: the paged extend attention kernel (`triton_extend.py`) on random ragged batches
  (decodes, chunks over cached prefixes, prompts, token trees; GQA groups of 4 and 8; head
  dims 64 and 128; sliding windows; keys split across programs; attention sinks, alone and
  with windows, trees and splits) in bf16 and fp32, against the dense-mask reference of
  `tests/engine_service/extend_reference.py`.
- LoRA: the Triton shrink/expand deltas (`layers/triton_lora.py`) against the torch path,
  with each path's time per layer on 8B-shaped projections; and a multi-LoRA engine (base
  model and two adapters mixed) with CUDA graphs and overlap equal to the same engine eager.
- Engine: the same greedy requests, with sliding windows, GQA, prefix sharing and a small
  token budget (so prompts are chunked and ride beside decodes), through
  `attention_backend="sdpa"` (eager, synchronous) and `"triton"` eager and with CUDA graphs
  for decode and mixed steps, synchronous and overlapped; tokens must agree and logprobs stay
  close. A small Mixtral (every layer's experts through the fused MoE kernel) and a small
  gpt-oss (random attention sinks, sliding and full layers alternating, biased experts) run
  the same way.
- Speculation: EAGLE chains and trees (greedy and seeded sampled), EAGLE-3 and a draft
  model (chains and trees) with CUDA graphs (target tree verification, the proposers' step
  graphs, whole draft chains and whole tree growths in one graph each) against the same
  engines eager and against plain decoding: tokens must be equal, every graph kind the
  method can use must have replayed (counts printed), and the drafts of the two engines are
  compared one for one (agreement printed; padded GEMMs may round differently, so only a
  large disagreement fails).
- MoE: the fused Triton MoE kernel (`engine_service/layers/moe_triton.py`) against the
  per-expert loop on Mixtral-, DeepSeek- and gpt-oss-like shapes (biases and the clamped
  SwiGLU), bf16 and fp32, from one token to prefill sizes; and once captured in a CUDA graph
  and replayed with a new routing (the kernel must not synchronise with the host).

    python bench/gpu_check.py [--kernel-only | --moe-only | --lora-only | --spec-only]
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_service.engine import EngineConfig, LLMEngine, SamplingParams
from engine_service.engine.triton_extend import ExtendConfig, paged_extend_attention
from engine_service.layers.moe import SWIGLU_OAI, LoopMoEKernel, select_experts
from engine_service.layers.moe_triton import fused_moe
from tests.engine_service.extend_reference import (
    SequenceSpec,
    build_case,
    dense_reference,
    mixed_specs,
)

# Largest |kernel - reference| allowed, by dtype (outputs are O(1): averages of N(0, 1) values).
KERNEL_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def check_extend_kernel(device: str = "cuda") -> int:
    """Random ragged batches through the extend kernel; returns the number of mismatches."""
    failures = 0
    rng = random.Random(0)
    split = ExtendConfig(rows=16, block_n=32, num_warps=4, num_stages=2, num_splits=4)
    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        for head_dim, group in ((64, 4), (128, 4), (128, 8)):
            for trees in (False, True):
                for window in (None, 100):
                    cases.append((dtype, head_dim, group, trees, window, None, False))
        cases.append((dtype, 128, 4, True, 60, split, False))
        cases.append((dtype, 64, 8, False, None, split, False))
        # Attention sinks (gpt-oss: head dim 64, GQA group 8, window 128 on every other layer).
        for trees, window, config in (
            (False, None, None),
            (False, 128, None),
            (True, 128, None),
            (False, None, split),
            (True, 60, split),
        ):
            cases.append((dtype, 64, 8, trees, window, config, True))
        cases.append((dtype, 128, 4, False, 100, None, True))
    for seed, (dtype, head_dim, group, trees, window, config, sinks) in enumerate(cases):
        specs = mixed_specs(rng, num_seqs=12, max_context=700, max_query=300, trees=trees)
        specs += [SequenceSpec(3000, 1), SequenceSpec(0, 1), SequenceSpec(1, 1)]
        case = build_case(
            specs,
            num_kv_heads=2,
            group=group,
            head_dim=head_dim,
            block_size=16,
            dtype=dtype,
            device=device,
            seed=seed,
        )
        scale = head_dim**-0.5
        sink_logits = None
        if sinks:
            gen = torch.Generator(device=device).manual_seed(seed)
            sink_logits = torch.randn(case.q.shape[1], generator=gen, device=device) * 2
            sink_logits = sink_logits.to(dtype)
        out = paged_extend_attention(
            case.q, case.kv_cache, case.layer, case.meta, scale, window, config, sink_logits
        )
        ref = dense_reference(
            case.q, case.kv_cache, case.layer, case.meta, scale, window, sink_logits
        )
        diff = (out.float() - ref.float()).abs().max().item()  # NaN (a stray read) fails too
        ok = diff <= KERNEL_TOLERANCE[dtype]
        failures += not ok
        print(
            f"extend {str(dtype)[6:]:8} d={head_dim:3} group={group} trees={trees!s:5} "
            f"window={window!s:4} splits={config.num_splits if config else 'auto'} "
            f"sinks={sinks!s:5} max_diff={diff:.2e} {'ok' if ok else 'MISMATCH'}",
            flush=True,
        )
    return failures


# Largest |fused - loop| / max |loop| allowed, by dtype.
MOE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _moe_case(tokens, hidden, inner, experts, top_k, bias, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    x = randn(tokens, hidden)
    w13 = randn(experts, 2 * inner, hidden, scale=hidden**-0.5)
    w2 = randn(experts, hidden, inner, scale=inner**-0.5)
    logits = torch.randn(tokens, experts, generator=gen, device="cuda")
    weights, ids = select_experts(logits, top_k, renormalize=True)
    biases = (randn(experts, 2 * inner), randn(experts, hidden)) if bias else (None, None)
    return x, w13, w2, weights, ids, biases


def check_moe_kernel() -> int:
    """The fused MoE kernel against the per-expert loop (fp32 maths on the same inputs);
    returns the number of mismatches."""
    failures = 0
    loop = LoopMoEKernel()
    shapes = [
        ("mixtral-like", 1024, 3584, 8, 2, "silu", False),
        ("deepseek-like", 2048, 512, 64, 6, "silu", False),
        ("gpt-oss-like", 720, 720, 32, 4, SWIGLU_OAI, True),
    ]
    for dtype in (torch.bfloat16, torch.float32):
        for name, hidden, inner, experts, top_k, act, bias in shapes:
            for tokens in (1, 7, 64, 513):
                x, w13, w2, weights, ids, biases = _moe_case(
                    tokens, hidden, inner, experts, top_k, bias, dtype, tokens
                )
                got = fused_moe(x, w13, w2, weights, ids, act, *biases).float()
                as_fp32 = [t.float() if t is not None else None for t in biases]
                want = loop.forward(x.float(), w13.float(), w2.float(), weights, ids, act, *as_fp32)
                diff = ((got - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
                ok = diff <= MOE_TOLERANCE[dtype]
                failures += not ok
                print(
                    f"moe {name:14} {dtype!s:15} tokens={tokens:<4} rel_diff={diff:.2e} "
                    f"{'ok' if ok else 'MISMATCH'}",
                    flush=True,
                )
    # A decode step captured in a CUDA graph, replayed with another routing.
    x, w13, w2, weights, ids, _ = _moe_case(8, 1024, 512, 16, 2, False, torch.bfloat16, 1)
    fused_moe(x, w13, w2, weights, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_moe(x, w13, w2, weights, ids)
    x2, _, _, weights2, ids2, _ = _moe_case(8, 1024, 512, 16, 2, False, torch.bfloat16, 2)
    x.copy_(x2)
    weights.copy_(weights2)
    ids.copy_(ids2)
    graph.replay()
    want = loop.forward(x.float(), w13.float(), w2.float(), weights, ids, "silu")
    diff = ((captured.float() - want).abs().max() / want.abs().max()).item()
    ok = diff <= MOE_TOLERANCE[torch.bfloat16]
    failures += not ok
    print(f"moe cuda-graph replay, new routing rel_diff={diff:.2e} {'ok' if ok else 'MISMATCH'}")
    return failures


def write_adapter(path: Path, config, rank: int, seed: int) -> str:
    """A PEFT-format adapter of ``rank`` on every projection of ``config``'s layers."""
    import json

    from safetensors.torch import save_file

    head_dim = config.hidden_size // config.num_attention_heads
    sizes = {
        "q_proj": (config.hidden_size, config.num_attention_heads * head_dim),
        "k_proj": (config.hidden_size, config.num_key_value_heads * head_dim),
        "v_proj": (config.hidden_size, config.num_key_value_heads * head_dim),
        "o_proj": (config.num_attention_heads * head_dim, config.hidden_size),
        "gate_proj": (config.hidden_size, config.intermediate_size),
        "up_proj": (config.hidden_size, config.intermediate_size),
        "down_proj": (config.intermediate_size, config.hidden_size),
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module, (fan_in, fan_out) in sizes.items():
            part = "self_attn" if module[0] in "qkvo" else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * 0.05
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.05
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": rank,
                "bias": "none",
                "target_modules": list(sizes),
            }
        )
    )
    return str(path)


def run(
    path: Path,
    backend: str,
    graphs: bool,
    prompts,
    overlap: bool = False,
    adapters: dict[str, str] | None = None,
    base_only: bool = False,
):
    lora = (
        dict(enable_lora=True, max_loras=len(adapters), max_lora_rank=16,
             lora_modules=tuple(adapters.items()))
        if adapters else {}
    )  # fmt: skip
    engine = LLMEngine(
        EngineConfig(
            model=str(path),
            device="cuda",
            dtype="float32",
            attention_backend=backend,
            enable_cuda_graphs=graphs,
            num_kv_blocks=512,
            max_num_batched_tokens=48,
            cuda_graph_max_batch=48,
            async_scheduling=overlap,
            **lora,
        )
    )
    replays: dict[str, int] = {}
    if engine.runner.graphs is not None:
        step_graphs = engine.runner.graphs
        fits = step_graphs.fits

        def counting(inputs):
            kind = step_graphs._kind(inputs)
            if kind is not None:
                replays[kind] = replays.get(kind, 0) + 1
            return fits(inputs)

        step_graphs.fits = counting
    run.replays = replays
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=0)
    tokens = {i: [] for i in range(len(prompts))}
    logprobs = {i: [] for i in range(len(prompts))}
    names = [None, *(adapters or {})]
    for i, p in enumerate(prompts):
        adapter = names[i % len(names)] if adapters and not base_only else None
        engine.add_request(str(i), p, params, adapter=adapter)
    while engine.has_unfinished():
        for out in engine.step():
            tokens[int(out.request_id)].extend(out.new_token_ids)
            logprobs[int(out.request_id)].extend(lp.logprob for lp in out.new_logprobs)
    return tokens, logprobs


def check_lora_engine(path: Path, prompts) -> int:
    """Multi-LoRA (Triton deltas) with graphs and overlap against the same engine eager;
    requests cycle through the base model and two adapters of ranks 16 and 8. Then base-only
    traffic on the LoRA engine (the graphs captured without deltas) against an engine without
    LoRA. Returns the number of failures."""
    config = transformers.AutoConfig.from_pretrained(path)
    adapters = {
        "a16": write_adapter(path / "a16", config, 16, 1),
        "a8": write_adapter(path / "a8", config, 8, 2),
    }
    ref_tokens, ref_lp = run(path, "triton", False, prompts, adapters=adapters)
    base_tokens, base_lp = run(path, "triton", False, prompts)
    changed = any(ref_tokens[i] != base_tokens[i] for i in (1, 2, 4, 5))
    tokens, lp = run(path, "triton", True, prompts, True, adapters=adapters)
    same = tokens == ref_tokens
    diff = max(abs(a - b) for i in lp for a, b in zip(lp[i], ref_lp[i]))
    ok = same and diff < 2e-3 and changed and bool(run.replays.get("decode"))
    failures = int(not ok)
    print(
        f"{'llama-lora':16} triton  graphs=True  overlap=True  "
        f"replays={run.replays} adapters_change_output={changed} "
        f"tokens_equal={same} max_logprob_diff={diff:.2e} {'ok' if ok else 'MISMATCH'}"
    )
    tokens, lp = run(path, "triton", True, prompts, True, adapters=adapters, base_only=True)
    same = tokens == base_tokens
    diff = max(abs(a - b) for i in lp for a, b in zip(lp[i], base_lp[i]))
    ok = same and diff < 2e-3 and bool(run.replays.get("decode"))
    failures += not ok
    print(
        f"{'llama-lora-base':16} triton  graphs=True  overlap=True  replays={run.replays} "
        f"tokens_equal={same} max_logprob_diff={diff:.2e} {'ok' if ok else 'MISMATCH'}"
    )
    return failures


def check_speculative_graphs(device: str = "cuda") -> int:
    """Speculation with CUDA graphs against the same engine eager (module docstring);
    returns the number of failures."""
    import json

    from tests.engine_service.eagle_heads import (
        make_copyable_target,
        write_copying_head,
        write_eagle_head,
    )

    failures = 0
    vocab, eos = 512, 2
    rng = random.Random(1)
    shared = [rng.randrange(3, vocab) for _ in range(40)]
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (1, 5, 17, 60, 150)]
    prompts += [shared + [rng.randrange(3, vocab) for _ in range(n)] for n in (3, 21)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # A head that usually agrees with its one-layer target: long accepted runs.
        target = make_copyable_target(root / "target", vocab, eos)
        write_copying_head(root / "head", root / "target")
        write_eagle_head(root / "eagle3", root / "target", 3, draft_vocab=300, aux_layers=(0, 0, 0))
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():  # a draft model: the target, perturbed
            for parameter in target.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        target.save_pretrained(root / "draft")
        tree = {"topk": 4, "num_draft_tokens": 16}
        specs = {
            "eagle": {"method": "eagle", "model": str(root / "head"), "num_speculative_tokens": 4},
            "eagle_tree": {
                "method": "eagle",
                "model": str(root / "head"),
                "num_speculative_tokens": 4,
                "tree": tree,
            },
            "eagle3": {
                "method": "eagle3",
                "model": str(root / "eagle3"),
                "num_speculative_tokens": 3,
            },
            "draft": {"model": str(root / "draft"), "num_speculative_tokens": 4},
            "draft_tree": {"model": str(root / "draft"), "num_speculative_tokens": 4, "tree": tree},
        }
        greedy = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
        # Seeded samples equal plain decoding's exactly in fp32 (trees verify every sample).
        seeded = [
            SamplingParams(max_tokens=48, temperature=0.8, seed=i, ignore_eos=True)
            for i in range(len(prompts))
        ]
        specs["eagle_tree_seeded"] = specs["eagle_tree"]
        # Trees sized by the batch: several sets of tree graphs in one memory pool.
        specs["eagle_tree_budget"] = {
            **specs["eagle_tree"],
            "tree": {**tree, "max_num_batched_draft_tokens": 32},
        }

        def engine(spec, graphs):
            return LLMEngine(
                EngineConfig(
                    model=str(root / "target"),
                    device=device,
                    dtype="float32",
                    attention_backend="triton",
                    enable_cuda_graphs=graphs,
                    num_kv_blocks=512,
                    max_num_seqs=16,
                    max_num_batched_tokens=256,
                    cuda_graph_max_batch=256,
                    speculative_config=json.dumps(spec) if spec else None,
                )
            )

        def generate(llm, params):
            proposals = []
            if llm.proposer is not None:
                propose = llm.proposer.propose

                def recording(batch):
                    drafts = propose(batch)
                    parents = llm.proposer.tree_parents()
                    # Drafts kept on the device are read back here, for the comparison only.
                    host = drafts if isinstance(drafts, dict) else drafts.to_host()
                    if not isinstance(drafts, dict):
                        parents = drafts.parents_to_host() or parents
                    for i, tokens in sorted(host.items()):
                        known = list(batch.sequences[i].request.all_token_ids)
                        proposals.append((known, tokens, parents.get(i)))
                    return drafts

                llm.proposer.propose = recording
            outputs = [samples[0] for samples in llm.generate(prompts, params)]
            return outputs, proposals

        plain_greedy, _ = generate(engine(None, True), greedy)
        plain_seeded, _ = generate(engine(None, True), seeded)
        for name, spec in specs.items():
            params, plain = (
                (seeded, plain_seeded) if name.endswith("seeded") else (greedy, plain_greedy)
            )
            eager_tokens, eager_drafts = generate(engine(spec, False), params)
            llm = engine(spec, True)
            tokens, drafts = generate(llm, params)
            proposer = llm.proposer
            step_replays = proposer.runner.graphs.replays if proposer.runner.graphs else {}
            chain_replays = proposer.chain_graphs.replays if proposer.chain_graphs else 0
            tree_replays = sum(g.replays for g in proposer.tree_graphs_by_size.values())
            # EAGLE trees: catch-ups run inside the tree graph once a request is past its prompt.
            catch_ups = sum(g.catch_up_replays for g in proposer.tree_graphs_by_size.values())
            target_replays = llm.runner.graphs.replays
            pairs = list(zip(drafts, eager_drafts, strict=False))
            agree = sum(a == b for a, b in pairs) / max(1, len(pairs))
            used = (
                tree_replays > 0 and target_replays.get("tree", 0) > 0
                if "tree" in name
                else chain_replays > 0 and target_replays.get("mixed", 0) > 0
            )
            if "tree" in name and name.startswith("eagle"):
                used = used and catch_ups > 0
            ok = tokens == plain and eager_tokens == plain and used and agree >= 0.9
            failures += not ok
            accepted = llm.scheduler.accepted_draft_tokens / max(1, llm.scheduler.num_drafts)
            print(
                f"spec {name:17} graphs vs eager: tokens_equal={tokens == eager_tokens} "
                f"equal_to_plain={tokens == plain} drafts_agree={agree:.2f} "
                f"accepted_per_round={accepted:.2f} target_replays={target_replays} "
                f"proposer_replays={step_replays} chain_replays={chain_replays} "
                f"tree_replays={tree_replays} tree_catch_ups={catch_ups} "
                f"{'ok' if ok else 'MISMATCH'}",
                flush=True,
            )
    return failures


def check_lora_kernels(device: str = "cuda") -> int:
    """The Triton LoRA shrink/expand deltas against the torch path (dense and grouped) on
    a stacked qkv and a down projection of the 8B shape, 8 adapter slots of ranks 8-16 and
    base tokens mixed; prints each path's time per layer. Returns the number of mismatches."""
    from engine_service.layers.linear import QKVParallelLinear, RowParallelLinear
    from engine_service.layers.lora import LoRASlots, TorchLoRA, TritonLoRA

    failures = 0
    gen = torch.Generator(device="cpu").manual_seed(0)
    layers = {
        "qkv 4096->6144": lambda: QKVParallelLinear(4096, 128, 32, 8),
        "down 14336->4096": lambda: RowParallelLinear(14336, 4096),
    }
    print(
        f"{'lora layer':18} {'dtype':9} {'tokens':>6} {'torch dense ms':>14} "
        f"{'torch grouped ms':>16} {'triton ms':>10} {'max diff':>9}"
    )
    for dtype in (torch.bfloat16, torch.float32):
        for name, build in layers.items():
            layer = build().to(device=device, dtype=dtype)
            slots = LoRASlots()
            torch_dense = TorchLoRA(layer, slots, 8, 16)
            deltas = {"dense": torch_dense}
            for key, cls in (("grouped", TorchLoRA), ("triton", TritonLoRA)):
                deltas[key] = cls(layer, slots, 8, 16)
            deltas["grouped"].dense = False
            for slot in range(8):
                rank = 16 if slot % 2 == 0 else 8
                for shard, width in torch_dense.pieces:
                    a = torch.randn(rank, layer.input_size, generator=gen) / layer.input_size**0.5
                    b = torch.randn(width, rank, generator=gen) / rank**0.5
                    for delta in deltas.values():
                        delta.set_adapter(
                            slot, shard, a.to(device, dtype), b.to(device, dtype), 2.0
                        )
            for tokens in (1, 16, 256, 2048):
                token_slots = torch.randint(-1, 8, (tokens,), generator=gen)
                if tokens == 2048:  # prefill segments: long runs of one adapter
                    token_slots = torch.arange(tokens) // 300 % 9 - 1
                x = torch.randn(tokens, layer.input_size, generator=gen).to(device, dtype)
                y0 = torch.randn(tokens, layer.output_size, generator=gen).to(device, dtype)
                slots.set(token_slots.to(device))
                outs, times = {}, {}
                for key, delta in deltas.items():
                    y = y0.clone()
                    delta.add_delta(x, y)
                    outs[key] = y.float()
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(20):
                        delta.add_delta(x, y0.clone())
                    end.record()
                    torch.cuda.synchronize()
                    times[key] = start.elapsed_time(end) / 20
                ref = outs["grouped"]
                scale = (ref - y0.float()).abs().max().item() + 1e-6
                diff = (outs["triton"] - ref).abs().max().item() / scale
                ok = diff < (2e-2 if dtype == torch.bfloat16 else 1e-3)
                failures += not ok
                print(
                    f"{name:18} {str(dtype)[6:]:9} {tokens:>6} {times['dense']:>14.3f} "
                    f"{times['grouped']:>16.3f} {times['triton']:>10.3f} "
                    f"{diff:>9.1e} {'ok' if ok else 'MISMATCH'}"
                )
    return failures


def main() -> int:
    if "--lora-only" in sys.argv[1:]:
        failures = check_lora_kernels()
        config = transformers.LlamaConfig(
            vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
            initializer_range=0.1,
        )  # fmt: skip
        rng = random.Random(0)
        prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (1, 7, 33, 100, 250)]
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
            failures += check_lora_engine(Path(tmp), prompts)
        return 1 if failures else 0
    if "--spec-only" in sys.argv[1:]:
        return 1 if check_speculative_graphs() else 0
    moe_only = "--moe-only" in sys.argv[1:]
    failures = check_moe_kernel()
    if not moe_only:
        failures += check_extend_kernel()
        try:
            failures += check_lora_kernels()
        except Exception as exc:  # report and go on to the engine checks
            print(f"lora kernels: {type(exc).__name__}: {exc} MISMATCH")
            failures += 1
    if "--kernel-only" in sys.argv[1:]:
        return 1 if failures else 0
    if not moe_only:
        failures += check_speculative_graphs()
    rng = random.Random(0)
    families = [
        ("llama", transformers.LlamaConfig, {}),
        ("mistral-window", transformers.MistralConfig, {"sliding_window": 24}),
        (
            "mixtral-moe",
            transformers.MixtralConfig,
            {"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": 24},
        ),
        (
            "gpt-oss-sinks",
            transformers.GptOssConfig,
            {
                "head_dim": 32,
                "num_local_experts": 8,
                "num_experts_per_tok": 2,
                "sliding_window": 24,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            },
        ),
    ]
    for name, cls, extra in families[2:] if moe_only else families:
        config = cls(
            vocab_size=512,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            initializer_range=0.1,
            **extra,
        )
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            model = transformers.AutoModelForCausalLM.from_config(config)
            if name == "gpt-oss-sinks":
                # Sinks and biases start at zero: random ones, so that dropping them shows.
                with torch.no_grad():
                    for layer in model.model.layers:
                        layer.self_attn.sinks.normal_(0, 1.0)
                        layer.mlp.router.bias.normal_(0, 0.5)
                        layer.mlp.experts.gate_up_proj_bias.normal_(0, 0.2)
                        layer.mlp.experts.down_proj_bias.normal_(0, 0.2)
            model.save_pretrained(tmp)
            shared = [rng.randrange(3, 512) for _ in range(40)]
            prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (1, 7, 33, 100, 250)]
            prompts += [shared + [rng.randrange(3, 512) for _ in range(n)] for n in (3, 20)]
            ref_tokens, ref_lp = run(Path(tmp), "sdpa", False, prompts)
            for backend, graphs, overlap in (
                ("triton", False, False),
                ("triton", True, False),
                ("triton", True, True),
            ):
                tokens, lp = run(Path(tmp), backend, graphs, prompts, overlap)
                same = tokens == ref_tokens
                diff = max(abs(a - b) for i in lp for a, b in zip(lp[i], ref_lp[i]))
                ok = same and diff < 2e-3
                if graphs and not run.replays.get("mixed"):
                    ok = False  # the mixed-step graphs must have been exercised
                failures += not ok
                print(
                    f"{name:16} {backend:7} graphs={graphs!s:5} overlap={overlap!s:5} "
                    f"replays={run.replays} tokens_equal={same} "
                    f"max_logprob_diff={diff:.2e} {'ok' if ok else 'MISMATCH'}"
                )
            if name == "llama":
                failures += check_lora_engine(Path(tmp), prompts)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
