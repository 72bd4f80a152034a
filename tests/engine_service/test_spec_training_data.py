"""The training rows of bench/train_spec.py: plain corpus text, and edit rows whose second
half repeats the first apart from one replaced stretch (what n-gram lookup is measured on)."""

from __future__ import annotations

import importlib.util
import json
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


def test_reuse_target_trains_proposers_beside_the_saved_target(tmp_path, monkeypatch):
    """Two toy runs of the script (one step each): the first trains the target (its rate,
    rows and steps overridden) and an EAGLE head; the second, with ``--reuse-target``,
    trains a draft for that same target, which it leaves untouched, and keeps the first
    run's recipe and losses beside the new one."""
    out = tmp_path / "trained"

    def run(*argv: str) -> None:
        monkeypatch.setattr("sys.argv", ["train_spec.py", "--out", str(out), *argv])
        train_spec.main()

    run("--steps", "1", "--target-steps", "2", "--seq", "64", "--batch", "2", "--lr", "1e-3",
        "--models", "eagle")  # fmt: skip
    weights = (out / "target" / "model.safetensors").read_bytes()
    first = json.loads((out / "train.json").read_text())
    assert (first["seq"], first["batch"], first["lr"], first["target_steps"]) == (64, 2, 1e-3, 2)
    assert first["models"] == ["target", "eagle"]

    run("--steps", "1", "--seq", "64", "--batch", "2", "--models", "draft", "--reuse-target")
    assert (out / "target" / "model.safetensors").read_bytes() == weights
    second = json.loads((out / "train.json").read_text())
    assert second["models"] == ["draft", "eagle", "target"]
    assert second["target_loss"] == first["target_loss"]
    assert second["eagle_loss"] == first["eagle_loss"]
    assert (second["lr"], second["target_steps"]) == (1e-3, 2)
    assert "draft_loss" in second and (out / "draft" / "config.json").exists()
    assert (second["layers"], second["hidden"]) == (4, 128)  # the saved target's shape

    # A recipe from before the target had its own rate and steps: those runs used 3e-3.
    old = {k: v for k, v in second.items() if k not in ("lr", "target_steps")}
    (out / "train.json").write_text(json.dumps(old))
    run("--steps", "1", "--seq", "64", "--batch", "2", "--models", "eagle", "--reuse-target")
    third = json.loads((out / "train.json").read_text())
    assert (third["lr"], third["target_steps"]) == (3e-3, 1)
    assert (out / "target" / "model.safetensors").read_bytes() == weights
