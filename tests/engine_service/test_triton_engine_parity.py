"""gpt-oss served on the Triton attention backend gives ``transformers``' greedy tokens and
logprobs: sinks on every layer, sliding (window 12) and full layers alternating.

The engine runs whole (scheduler, runner, kernel warm-up, the paged extend kernel on every
step) in a child process under Triton's interpreter, since CI has no GPU. One engine covers
the parity modes at once to keep the interpreter's time down: a pool of 14 blocks of 4 forces
preemption, a budget of 16 tokens chunks the prompts, and a second wave of the same prompts
hits the prefix cache.
"""

from __future__ import annotations

import pytest
import torch

from tests.engine_service.conftest import make_checkpoint
from tests.engine_service.test_parity import LOGPROB_TOL, MAX_NEW, _prompts, _reference
from tests.engine_service.triton_interpreter import InterpretedTriton

pytest.importorskip("triton")


def test_gpt_oss_on_the_triton_backend_matches_transformers(tmp_path):
    model = make_checkpoint(tmp_path, "gpt_oss")
    prompts = _prompts(model.config.vocab_size)
    assert max(len(p) for p in prompts) > 2 * model.config.sliding_window
    with torch.no_grad():
        expected = [_reference(model, p) for p in prompts]

    interpreter = InterpretedTriton()
    try:
        tokens, logprobs, stats = interpreter.call(
            "tests.engine_service.interpreted_engine:greedy",
            str(tmp_path),
            prompts,
            MAX_NEW,
            dict(
                num_kv_blocks=14,
                block_size=4,
                max_num_batched_tokens=16,
                enable_prefix_caching=True,
            ),
            waves=2,
        )
    finally:
        interpreter.close()

    for wave in range(2):
        for i, (want_tokens, want_logprobs) in enumerate(expected):
            assert tokens[wave][i] == want_tokens, f"prompt {i} wave {wave}"
            assert torch.allclose(
                torch.tensor(logprobs[wave][i]), torch.tensor(want_logprobs), atol=LOGPROB_TOL
            ), f"prompt {i} wave {wave}"
    assert stats["prefix_cache_hits"] > 0
    assert stats["num_preemptions"] > 0
    assert stats["blocks_leaked"] == 0
