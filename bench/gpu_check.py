"""GPU check of the Triton kernels and CUDA graphs against the SDPA reference path.

Runs on a CUDA machine (CI has none): the same greedy requests, with sliding windows, GQA,
prefix sharing and a small token budget (so prompts are chunked and ride beside decodes),
through `attention_backend="sdpa"` (eager, synchronous) and `"triton"` eager and with CUDA
graphs for decode and mixed steps, synchronous and overlapped; tokens must agree and
logprobs stay close. Exit status 1 on a mismatch.

    python bench/gpu_check.py
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


def run(path: Path, backend: str, graphs: bool, prompts, overlap: bool = False):
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
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    while engine.has_unfinished():
        for out in engine.step():
            tokens[int(out.request_id)].extend(out.new_token_ids)
            logprobs[int(out.request_id)].extend(lp.logprob for lp in out.new_logprobs)
    return tokens, logprobs


def main() -> int:
    failures = 0
    rng = random.Random(0)
    for name, cls, extra in [
        ("llama", transformers.LlamaConfig, {}),
        ("mistral-window", transformers.MistralConfig, {"sliding_window": 24}),
    ]:
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
            transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
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
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
