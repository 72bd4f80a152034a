"""GPU check of the parallel engines on two (or four) CUDA devices (NCCL), against one.

CI runs the same checks on the CPU with gloo (tests/engine_service/test_tensor_parallel.py,
test_expert_parallel.py, test_data_parallel.py); this is the NCCL path, which only a GPU
machine can run (the ``nvidia-h200-x2`` kind; ``nvidia-h200-x4`` adds the DP x TP check).
Exit status 1 on any mismatch.

- Engine: greedy requests with logprobs (shared prefixes, chunked prefill, overlapped
  scheduling) through an engine with ``tensor_parallel_size=2`` and through one on a single
  GPU; tokens must be equal and logprobs within 2e-3.
- Data-parallel attention: a tiny Mixtral at ``data_parallel_size=2`` with expert
  parallelism (each GPU its own batch and KV cache, steps and logits sent point to point
  over NCCL, dummy batches on an idle rank) against one GPU; same tolerance.
- LoRA: the engine check again with two adapters (ranks 16 and 8, every projection) and
  the base model mixed in the batch, at ``tensor_parallel_size=2`` (adapter slot weights
  sent to rank 1 over NCCL, the Triton shrink/expand on each rank's shards) against one GPU.
- DeepSeek-V3 (latent attention split by heads, latent cache on every rank, grouped
  routing): a tiny one at ``tensor_parallel_size=2``, then with expert parallelism.
- With four GPUs: the Mixtral at ``data_parallel_size=2, tensor_parallel_size=2`` with
  expert parallelism (tensor-parallel groups inside the data-parallel ranks).
- Layer: a FusedMoE with ``expert_parallel`` over the two GPUs (NCCL all-to-all, with and
  without the micro-batch overlap) against the same layer on one GPU, in fp32.
- Speculation over the ranks: with ``tensor_parallel_size=2`` n-gram lookup, a draft model
  split over the GPUs and one whole on the first, EAGLE-1 chains and trees and an EAGLE-3
  head (reduced vocabulary) stepping on both GPUs (draft steps and hidden rows broadcast
  over NCCL); with ``data_parallel_size=2`` an EAGLE head and a draft model drafting on each
  GPU for its own batch (steps, logits and head outputs sent point to point). Random heads
  and a draft close to the target: greedy tokens must equal the same layout's without
  speculation.
- KV offload: at ``tensor_parallel_size=2`` and ``data_parallel_size=2`` (and DP=2 x TP=2
  on four GPUs), a small KV pool whose shared prefixes are evicted between requests and
  restored from each rank's pinned host tier, and a second engine of the same layout that
  reads the prefixes from a KV service (in this process, on disk) written by the first,
  against the same layout without offload: tokens equal, logprobs within 2e-3, restores
  counted. ``--offload-only`` runs these alone.

    python bench/parallel_check.py [--offload-only]
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_service.engine import EngineConfig, LLMEngine, SamplingParams
from engine_service.layers.moe import FusedMoE
from engine_service.layers.parallel import TensorParallel

LOGPROB_TOLERANCE = 2e-3
HIDDEN, INNER, EXPERTS, TOP_K = 256, 512, 16, 4


def make_llama(path: Path) -> None:
    config = transformers.LlamaConfig(
        vocab_size=1001,  # odd: the second rank's vocabulary rows are padded
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path)


def make_mixtral(path: Path) -> None:
    config = transformers.MixtralConfig(
        vocab_size=1001,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).eval().save_pretrained(path)


def make_deepseek(path: Path) -> None:
    config = transformers.DeepseekV3Config(
        vocab_size=1001,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=8,
        n_shared_experts=1,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        kv_lora_rank=64,
        q_lora_rank=96,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=1024,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    transformers.DeepseekV3ForCausalLM(config).eval().save_pretrained(path)


def run_engine(path: Path, prompts, adapters: dict[str, str] | None = None, **knobs) -> list:
    """Every prompt's greedy logprobs; with ``adapters`` (name: folder), request ``i`` asks
    for the base model or one of them in turn."""
    lora = (
        dict(enable_lora=True, max_loras=len(adapters), max_lora_rank=16,
             lora_modules=tuple(adapters.items()))
        if adapters else {}
    )  # fmt: skip
    engine = LLMEngine(
        EngineConfig(
            model=str(path),
            dtype="float32",
            device="cuda",
            num_kv_blocks=512,
            max_num_batched_tokens=64,
            **lora,
            **knobs,
        )
    )
    params = SamplingParams(temperature=0.0, max_tokens=32, logprobs=2, ignore_eos=True)
    names = [None, *(adapters or {})]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params, adapter=names[i % len(names)])
    outputs: dict[str, list] = {}
    while engine.has_unfinished():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).extend(output.new_logprobs or [])
    engine.close()
    return [outputs[f"r{i}"] for i in range(len(prompts))]


def check_engine(path: Path, adapters: dict[str, str] | None = None, **parallel_knobs) -> bool:
    """``parallel_knobs`` default: tensor_parallel_size=2. Five requests: under data
    parallelism rank 0 takes three, rank 1 two, and the ranks finish at different steps."""
    rng = random.Random(0)
    prefix = [rng.randrange(3, 1001) for _ in range(40)]
    prompts = [prefix + [rng.randrange(3, 1001) for _ in range(n)] for n in (5, 70, 130)]
    prompts += [[rng.randrange(3, 1001) for _ in range(n)] for n in (3, 200)]
    single = run_engine(path, prompts, adapters)
    parallel_knobs = parallel_knobs or {"tensor_parallel_size": 2}
    parallel = run_engine(path, prompts, adapters, **parallel_knobs)
    ok = True
    for i, (a, b) in enumerate(zip(single, parallel)):
        tokens_a, tokens_b = [lp.token_id for lp in a], [lp.token_id for lp in b]
        worst = max(abs(x.logprob - y.logprob) for x, y in zip(a, b))
        same = tokens_a == tokens_b and worst <= LOGPROB_TOLERANCE
        ok &= same
        verdict = "equal" if tokens_a == tokens_b else "DIFFER"
        what = f"{parallel_knobs}{' with adapters' if adapters else ''}"
        print(f"engine {what} request {i}: tokens {verdict}, "
              f"max |logprob diff| {worst:.2e}")  # fmt: skip
    return ok


def write_drafters(path: Path, out: Path) -> None:
    """Random EAGLE-1 and EAGLE-3 heads for the llama at ``path`` (train_spec's layouts,
    untrained), and a draft: the target with a little noise (drafts often accepted)."""
    from train_spec import Eagle1, Eagle3, save_head

    cfg = transformers.LlamaConfig.from_pretrained(path)
    torch.manual_seed(1)
    base = {**cfg.to_dict(), "num_hidden_layers": 1}
    save_head(out / "eagle", Eagle1(cfg).state(), {**base, "architectures": ["LlamaForCausalLM"]})
    draft_vocab = 300
    kept = torch.randperm(cfg.vocab_size)[:draft_vocab].sort().values
    t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    t2d[kept] = True
    save_head(
        out / "eagle3",
        {**Eagle3(cfg, draft_vocab).state(), "d2t": kept - torch.arange(draft_vocab), "t2d": t2d},
        {
            **base,
            "architectures": ["LlamaForCausalLMEagle3"],
            "draft_vocab_size": draft_vocab,
            "eagle_aux_hidden_state_layer_ids": [0, 2, 3],
        },
    )
    draft = transformers.LlamaForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(0.002 * torch.randn_like(parameter))
    draft.save_pretrained(out / "draft")


def check_speculation(path: Path, tmp: Path) -> bool:
    """Every method over two GPUs against the same layout without speculation."""
    write_drafters(path, tmp)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 1001) for _ in range(n)] for n in (5, 40, 130)]
    motif = [rng.randrange(3, 1001) for _ in range(6)]
    prompts.append(motif * 8)  # something for n-gram lookup to find

    def spec(method: str, model: str | None = None, **extra) -> str:
        config = {"method": method, "num_speculative_tokens": 4, **extra}
        if model:
            config["model"] = str(tmp / model)
        return json.dumps(config)

    tree = {"topk": 3, "num_draft_tokens": 10}
    cases = {
        "tensor_parallel_size": [
            spec("ngram", prompt_lookup_min=1),
            spec("draft_model", "draft", tree=tree),
            spec("draft_model", "draft", draft_tensor_parallel_size=1),
            spec("eagle", "eagle"),
            spec("eagle", "eagle", tree=tree),
            spec("eagle3", "eagle3"),
        ],
        "data_parallel_size": [
            spec("eagle", "eagle", tree=tree),
            spec("draft_model", "draft", tree=tree),
        ],
    }
    ok = True
    for layout, specs in cases.items():
        expected = [[lp.token_id for lp in r] for r in run_engine(path, prompts, **{layout: 2})]
        for speculative_config in specs:
            got = run_engine(path, prompts, **{layout: 2}, speculative_config=speculative_config)
            same = [[lp.token_id for lp in r] for r in got] == expected
            ok &= same
            print(f"speculation {layout}=2 {speculative_config}: tokens "
                  f"{'equal' if same else 'DIFFER'}")  # fmt: skip
    return ok


def offload_engine(path: Path, remote: str | None = None, **knobs) -> LLMEngine:
    store = None
    if remote is not None:
        from engine_service.kv_connector import KVServiceStore

        store = KVServiceStore(remote)
    config = EngineConfig(
        model=str(path),
        dtype="float32",
        device="cuda",
        block_size=16,
        max_num_batched_tokens=256,
        **knobs,
    )
    return LLMEngine(config, store)


def greedy_in_waves(engine: LLMEngine, waves: list[list[list[int]]]) -> list[list]:
    """Each wave's prompts together, one wave after the other (so that later waves evict
    the blocks of earlier ones; under data parallelism a wave's prompts go to different
    ranks); every prompt's greedy logprobs, in order."""
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=1, ignore_eos=True)
    results = []
    for w, wave in enumerate(waves):
        got: dict[str, list] = {f"w{w}p{i}": [] for i in range(len(wave))}
        for rid, prompt in zip(got, wave):
            engine.add_request(rid, prompt, params)
        while engine.has_unfinished():
            for output in engine.step():
                got[output.request_id].extend(output.new_logprobs or [])
        results.extend(got.values())
    return results


def same_greedy(what: str, expected: list[list], got: list[list]) -> bool:
    ok = True
    for i, (a, b) in enumerate(zip(expected, got)):
        tokens_a, tokens_b = [lp.token_id for lp in a], [lp.token_id for lp in b]
        worst = max(abs(x.logprob - y.logprob) for x, y in zip(a, b))
        same = tokens_a == tokens_b and worst <= LOGPROB_TOLERANCE
        ok &= same
        print(f"offload {what} request {i}: tokens {'equal' if tokens_a == tokens_b else 'DIFFER'}, "
              f"max |logprob diff| {worst:.2e}")  # fmt: skip
    return ok


class KVServiceThread:
    """The KV service (disk store under ``work``) on an event loop of its own thread."""

    def __init__(self, work: Path) -> None:
        from kv_service.server import KVServer
        from switchyard.settings import KVServiceSettings

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        settings = KVServiceSettings(
            host="127.0.0.1",
            port=0,
            metrics_port=0,
            kv_store=f"disk:{work / 'kv'}",
            kv_memory_bytes=0,  # every read goes to the disk
            data_dir=work,
        )
        self.server = KVServer(settings)
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result()
        self.address = f"127.0.0.1:{self.server.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()


def check_offload(path: Path, work: Path, num_kv_blocks: int, **parallel) -> bool:
    """Two 320-token prefixes (20 blocks of 16) pushed out of a small pool by unrelated
    400-token prompts and restored from the host tier; then a second engine of the same
    layout reads them from the KV service the first wrote to (write-through)."""
    rng = random.Random(5)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, 1001) for _ in range(n)]

    systems = [tokens(320), tokens(320)]
    waves = []
    for n in (5, 9, 17):
        waves.append([system + tokens(n) for system in systems])
        waves.append([tokens(400), tokens(400)])
    reader_wave = [system + tokens(11) for system in systems]
    reference = offload_engine(path, num_kv_blocks=512, **parallel)
    expected = greedy_in_waves(reference, [*waves, reader_wave])
    reference.close()
    service = KVServiceThread(work)
    knobs = dict(
        num_kv_blocks=num_kv_blocks,
        enable_kv_offload=True,
        kv_offload_host_bytes=64 << 20,
        **parallel,
    )
    prefix_blocks = 2 * 320 // 16
    ok = True
    try:
        writer = offload_engine(path, service.address, **knobs)
        try:
            ok &= same_greedy(f"{parallel} host tier", expected, greedy_in_waves(writer, waves))
            deadline = time.monotonic() + 30
            while writer.stats().remote_put_blocks < prefix_blocks:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            stats = writer.stats()
        finally:
            writer.close()
        print(f"offload {parallel} host tier: offloaded {stats.offloaded_blocks}, restored "
              f"{stats.restored_blocks_host}, put {stats.remote_put_blocks} blocks, "
              f"remote errors {stats.remote_errors}")  # fmt: skip
        ok &= stats.restored_blocks_host > 0 and stats.remote_put_blocks >= prefix_blocks
        reader = offload_engine(path, service.address, **knobs)
        try:
            got = greedy_in_waves(reader, [reader_wave])
            ok &= same_greedy(f"{parallel} KV service", expected[-2:], got)
            hits = reader.stats().remote_hit_tokens
        finally:
            reader.close()
        print(f"offload {parallel} KV service: {hits} prompt tokens restored from the service "
              f"(the prefixes hold {2 * 320})")  # fmt: skip
        ok &= hits == 2 * 320
    finally:
        service.close()
    return ok


def build_moe(tp: TensorParallel, device) -> FusedMoE:
    moe = FusedMoE(EXPERTS, TOP_K, HIDDEN, INNER, tp=tp).to(device)
    for e in range(EXPERTS):
        if moe.ep is not None and not moe.ep.holds(e):
            continue
        generator = torch.Generator().manual_seed(e)
        for piece in ("gate", "up"):
            moe.weight_loader(moe.w13, torch.randn(INNER, HIDDEN, generator=generator) / 10,
                              (e, piece))  # fmt: skip
        moe.weight_loader(moe.w2, torch.randn(HIDDEN, INNER, generator=generator) / 10,
                          (e, "down"))  # fmt: skip
    return moe


def moe_inputs(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(n, HIDDEN, generator=generator)
    return x.to(device), torch.randn(n, EXPERTS, generator=generator).to(device)


def moe_rank(rank: int, init_file: str, out_dir: str) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=2)
    moe = build_moe(TensorParallel(rank, 2, expert_parallel=True), device)
    results = {}
    with torch.inference_mode():
        for overlap in (True, False):
            moe.ep.overlap = overlap
            for n in (1, 7, 512):
                results[(overlap, n)] = moe(*moe_inputs(n, device)).cpu()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def check_moe() -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(moe_rank, args=(os.path.join(tmp, "init"), tmp), nprocs=2)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    single = build_moe(TensorParallel(), torch.device("cuda", 0))
    ok = True
    with torch.inference_mode():
        for (overlap, n), _ in sorted(ranks[0].items()):
            expected = single(*moe_inputs(n, torch.device("cuda", 0))).cpu()
            worst = max((r[(overlap, n)] - expected).abs().max().item() for r in ranks)
            good = worst <= 1e-4
            ok &= good
            print(f"moe ep=2 overlap={overlap} tokens={n}: max |diff| {worst:.2e} "
                  f"{'ok' if good else 'MISMATCH'}")  # fmt: skip
    return ok


def main() -> None:
    if torch.cuda.device_count() < 2:
        sys.exit(f"needs 2 CUDA devices, {torch.cuda.device_count()} visible")
    if "--offload-only" in sys.argv[1:]:
        ok = main_offload()
        print("parallel offload check:", "PASS" if ok else "FAIL")
        sys.exit(0 if ok else 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llama"
        make_llama(path)
        engine_ok = check_engine(path)
        from bench.gpu_check import write_adapter

        config = transformers.AutoConfig.from_pretrained(path)
        adapters = {
            "a16": write_adapter(Path(tmp) / "a16", config, 16, 1),
            "a8": write_adapter(Path(tmp) / "a8", config, 8, 2),
        }
        engine_ok &= check_engine(path, adapters)
        mixtral = Path(tmp) / "mixtral"
        make_mixtral(mixtral)
        engine_ok &= check_engine(mixtral, data_parallel_size=2, enable_expert_parallel=True)
        deepseek = Path(tmp) / "deepseek"
        make_deepseek(deepseek)
        engine_ok &= check_engine(deepseek, tensor_parallel_size=2)
        engine_ok &= check_engine(deepseek, tensor_parallel_size=2, enable_expert_parallel=True)
        if torch.cuda.device_count() >= 4:
            engine_ok &= check_engine(
                mixtral, data_parallel_size=2, tensor_parallel_size=2, enable_expert_parallel=True
            )
        else:
            print("dp=2 x tp=2: skipped (needs 4 CUDA devices)")
        engine_ok &= check_speculation(path, Path(tmp))
    moe_ok = check_moe()
    offload_ok = main_offload()
    ok = engine_ok and moe_ok and offload_ok
    print("parallel check:", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


def main_offload() -> bool:
    # One pool for both prompts of a wave under TP, one per data-parallel rank under DP:
    # either way a wave of 400-token prompts evicts most of the prefixes.
    layouts = [(64, {"tensor_parallel_size": 2}), (32, {"data_parallel_size": 2})]
    if torch.cuda.device_count() >= 4:
        layouts.append((32, {"data_parallel_size": 2, "tensor_parallel_size": 2}))
    else:
        print("offload dp=2 x tp=2: skipped (needs 4 CUDA devices)")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llama"
        make_llama(path)
        for i, (num_kv_blocks, parallel) in enumerate(layouts):
            work = Path(tmp) / f"offload-{i}"
            work.mkdir()
            ok &= check_offload(path, work, num_kv_blocks, **parallel)
    return ok


if __name__ == "__main__":
    main()
