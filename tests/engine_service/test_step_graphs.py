"""The CUDA-graph step path's CPU twin: bucketing and padding of decode and mixed steps.

CI has no GPU, so :class:`StepGraphs` runs with ``capture=False``: each step is copied into
the same static, padded buffers a captured graph reads and the model runs on them eagerly
(SDPA backend). Tokens must equal the plain ragged path's. ``bench/gpu_check.py`` checks the
captured graphs themselves against the SDPA reference on a GPU.
"""

from __future__ import annotations

import random

import pytest

from engine_service.engine.cuda_graphs import StepGraphs
from tests.engine_service.helpers import (
    VOCAB,
    greedy,
    make_engine,
    make_llama_checkpoint,
    run_all,
    tokens_of,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-graphs")
    make_llama_checkpoint(path)
    return path


def run(engine, prompts, counter: dict | None = None):
    if counter is not None:
        graphs = engine.runner.graphs
        fits = graphs.fits

        def counting(inputs):
            ok = fits(inputs)
            if ok:
                counter[graphs._kind(inputs)] = counter.get(graphs._kind(inputs), 0) + 1
            return ok

        graphs.fits = counting
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy(8 + i, ignore_eos=True))
    return {key: tokens_of(outs) for key, outs in run_all(engine).items()}


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_padded_graph_buffers_give_the_plain_paths_tokens(checkpoint, async_scheduling):
    rng = random.Random(3)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (3, 7, 2, 19, 5, 11)]
    settings = dict(max_num_batched_tokens=24, num_kv_blocks=96, async_scheduling=async_scheduling)
    plain = make_engine(checkpoint, **settings)
    twin = make_engine(checkpoint, **settings)
    twin.runner.graphs = StepGraphs(
        twin.runner, max_tokens=16, max_seqs=8, capture=False, mixed=True
    )
    used: dict[str, int] = {}

    expected = run(plain, prompts)
    got = run(twin, prompts, used)

    assert got == expected
    assert used.get("decode", 0) > 0 and used.get("mixed", 0) > 0, used
    plain.close()
    twin.close()
