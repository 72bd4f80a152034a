"""The model fingerprint: equal exactly when KV block bytes mean the same thing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from switchyard.fingerprint import FINGERPRINT_BYTES, checkpoint_id, kv_fingerprint

SHAPE = (2, 2, 16, 4, 8)


def write_checkpoint(root: Path, weights: bytes, config: str = '{"hidden_size": 64}') -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(config)
    (root / "model.safetensors").write_bytes(weights)
    return root


def test_the_fingerprint_is_sixteen_stable_bytes():
    first = kv_fingerprint("llama", "bfloat16", SHAPE)
    assert len(first) == FINGERPRINT_BYTES
    assert first == kv_fingerprint("llama", "bfloat16", list(SHAPE))


@pytest.mark.parametrize(
    "other",
    [
        ("qwen", "bfloat16", SHAPE),
        ("llama", "float16", SHAPE),
        ("llama", "bfloat16", (2, 2, 32, 4, 8)),
        ("llama", "bfloat16", (22, 16, 4, 8)),  # the same digits, another shape
    ],
    ids=["model", "dtype", "block-size", "shape-digits"],
)
def test_model_dtype_and_block_shape_each_change_the_fingerprint(other):
    assert kv_fingerprint("llama", "bfloat16", SHAPE) != kv_fingerprint(*other)


def test_a_torch_dtype_and_its_name_give_one_fingerprint():
    assert kv_fingerprint("m", torch.bfloat16, SHAPE) == kv_fingerprint("m", "bfloat16", SHAPE)


def test_copies_of_a_checkpoint_agree_wherever_they_lie(tmp_path: Path):
    first = write_checkpoint(tmp_path / "a", bytes(range(256)) * 1024)
    copy = tmp_path / "elsewhere" / "b"
    shutil.copytree(first, copy)
    assert checkpoint_id(first) == checkpoint_id(copy)


@pytest.mark.parametrize("where", ["head", "tail", "config"])
def test_a_fine_tune_of_the_same_shape_gets_another_id(tmp_path: Path, where: str):
    weights = bytearray(bytes(range(256)) * 1024)  # 256 KiB: head and tail samples apart
    base = write_checkpoint(tmp_path / "base", bytes(weights))
    config = '{"hidden_size": 64}'
    if where == "head":
        weights[10] ^= 1
    elif where == "tail":
        weights[-10] ^= 1
    else:
        config = '{"hidden_size": 64, "rope_theta": 500000}'
    tuned = write_checkpoint(tmp_path / "tuned", bytes(weights), config)
    assert checkpoint_id(base) != checkpoint_id(tuned)
