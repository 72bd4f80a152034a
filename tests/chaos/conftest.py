"""Fixtures of the chaos suite: one small checkpoint and one ``switchyard up`` stack for the
whole folder (starting a stack is the slow part), and the checks every chaos test ends with.

The stack runs one engine that takes one request at a time (``--max-num-seqs 1``) and queues
four more, so that a test can hold one request running and others waiting, and knows which
engine has them, and a burst of a few dozen is far over capacity; its
context is long enough for a stream that outlasts a kill. Its internal ports are ``up``'s
defaults (or the free ports ``up`` falls back to), as a user's would be. Every test leaves
the stack serving and idle for the next; the fixture stops it and checks that no process of
it is left.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from switchyard.demo import make_test_checkpoint
from tests.e2e.stack import Stack, marked_pids, start_stack, stop_stack


@pytest.fixture(scope="session")
def chaos_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_checkpoint(
        tmp_path_factory.mktemp("chaos-checkpoint"),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=2048,
    )


# A request that produced nothing waits this long for the killed engine's restart (loading
# torch and the model on a busy CI machine can take a while).
SETTINGS = """
gateway:
  failover_wait_s: 120
"""


def stack_args(work_dir: Path) -> list[str]:
    """The flags (besides those of ``start_stack``) every chaos stack runs with."""
    settings = work_dir / "settings.yaml"
    settings.write_text(SETTINGS)
    return [
        "--max-num-seqs", "1",
        "--max-queued-requests", "4",  # a burst of a few dozen is far over capacity
        "--max-model-len", "2048",
        "--config", str(settings),
    ]  # fmt: skip


@pytest.fixture(scope="session")
def chaos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chaos")


@pytest.fixture(scope="session")
def chaos_stack(chaos_checkpoint: Path, chaos_dir: Path) -> Iterator[Stack]:
    stack = start_stack(
        chaos_checkpoint,
        chaos_dir,
        engines=1,
        extra_args=stack_args(chaos_dir),
        explicit_ports=False,
    )
    yield stack
    code = stop_stack(stack)
    left = marked_pids(stack.mark)
    assert code == 0, stack.output.read_text()
    assert left == [], f"processes left behind: {left}"
