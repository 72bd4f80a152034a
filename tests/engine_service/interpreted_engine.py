"""An engine whose attention is the Triton backend, run on the CPU by Triton's interpreter.

Only for a child process of :class:`tests.engine_service.triton_interpreter.InterpretedTriton`:
the backend registry refuses ``triton`` off CUDA, so the Triton backend is registered again
under a test-only name that skips that check; everything else (model, scheduler, runner,
kernel warm-up) is the engine as served.
"""

from __future__ import annotations

from engine_service.engine import EngineConfig, LLMEngine, SamplingParams
from engine_service.engine.attention import register_backend
from engine_service.engine.attention.triton_backend import TritonBackend

# Imported so that InterpretedTriton can check that this module's kernels are interpreted.
from engine_service.engine.triton_extend import _paged_extend_kernel  # noqa: F401

BACKEND = "triton-interpreted"


def greedy(
    path: str, prompts: list[list[int]], max_new: int, settings: dict, waves: int = 1
) -> tuple[list[list[list[int]]], list[list[list[float]]], dict]:
    """Greedy tokens and their logprobs (``[wave][prompt]``) for every prompt, batched in one
    engine, the prompts sent again in each later wave once the previous one finished; and the
    engine's prefix hits, preemptions and free blocks at the end."""
    register_backend(BACKEND, lambda: TritonBackend)
    engine = LLMEngine(
        EngineConfig(model=path, dtype="float32", attention_backend=BACKEND, **settings)
    )
    if type(engine.runner.backend) is not TritonBackend:
        raise RuntimeError(f"engine runs {type(engine.runner.backend).__name__}, not Triton")
    params = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True, logprobs=0)
    all_tokens, all_logprobs = [], []
    for wave in range(waves):
        ids = [f"{wave}-{i}" for i in range(len(prompts))]
        for rid, prompt in zip(ids, prompts):
            engine.add_request(rid, prompt, params)
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        logprobs: dict[str, list[float]] = {rid: [] for rid in ids}
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id].extend(out.new_token_ids)
                logprobs[out.request_id].extend(lp.logprob for lp in out.new_logprobs or [])
        all_tokens.append([tokens[r] for r in ids])
        all_logprobs.append([logprobs[r] for r in ids])
    stats = engine.stats()
    return (
        all_tokens,
        all_logprobs,
        {
            "prefix_cache_hits": stats.prefix_cache_hits,
            "num_preemptions": stats.num_preemptions,
            "blocks_leaked": stats.num_blocks_total - stats.num_blocks_free,
        },
    )
