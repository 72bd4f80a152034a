"""The training rows of bench/train_spec.py: plain corpus text, and edit rows whose second
half repeats the first apart from one replaced stretch (what n-gram lookup is measured on)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[2] / "bench" / "train_spec.py"
_spec = importlib.util.spec_from_file_location("train_spec", _PATH)
train_spec = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_spec)


def _corpus() -> torch.Tensor:
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i * 7}\n\n" for i in range(400))
    return torch.tensor(list(text.encode()), dtype=torch.long) + 3


def test_plain_rows_are_corpus_spans():
    ids = _corpus()
    rows = next(train_spec.batches(ids, 64, 8, torch.Generator().manual_seed(0), "cpu"))
    assert rows.shape == (8, 64)
    text = bytes((ids - 3).tolist())
    for row in rows:
        assert bytes((row - 3).tolist()) in text


def test_edit_rows_repeat_the_snippet_with_one_stretch_changed():
    ids = _corpus()
    seq = 128
    rows = next(train_spec.batches(ids, seq, 16, torch.Generator().manual_seed(1), "cpu", 1.0))
    assert rows.shape == (16, seq)
    for row in rows:
        text = bytes((row - 3).tolist()).decode()
        separator = next(s for s in train_spec.EDIT_SEPARATORS if s in text)
        snippet, copy = text.split(separator, 1)
        assert len(copy) == seq - len(snippet) - len(separator) and len(copy) > 24
        changed = [i for i, (a, b) in enumerate(zip(snippet, copy)) if a != b]
        # One replaced stretch of 8-24 bytes (its bytes may happen to agree in places).
        assert changed and changed[-1] - changed[0] < 24


def test_edit_share_picks_about_that_many_rows():
    ids = _corpus()
    rows = next(train_spec.batches(ids, 96, 400, torch.Generator().manual_seed(2), "cpu", 0.25))
    marks = [s.encode() for s in train_spec.EDIT_SEPARATORS]
    edits = sum(any(m in bytes((r - 3).tolist()) for m in marks) for r in rows)
    assert 60 <= edits <= 140
