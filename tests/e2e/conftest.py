"""Fixtures of the e2e suite: one small checkpoint with a real tokenizer for the whole session,
and one stack serving it for the API tests (the fleet tests start their own)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from switchyard.demo import make_test_checkpoint
from tests.e2e.stack import Stack, start_stack, stop_stack


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_checkpoint(
        tmp_path_factory.mktemp("checkpoint"),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=2048,
    )


@pytest.fixture(scope="session")
def stack(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = start_stack(checkpoint, tmp_path_factory.mktemp("stack"), engines=1)
    yield started
    stop_stack(started)
