"""``python -m engine_service`` tells a start that no restart can fix (status 78, with one
``engine cannot start`` line) from a crash, so that its supervisor stops instead of looping."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from switchyard.demo import make_test_checkpoint
from switchyard.exit_codes import CANNOT_START

REPO = Path(__file__).resolve().parents[2]


def run_engine(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "engine_service", "--device", "cpu", "--port", "0",
            "--metrics-port", "0", "--controller-address", "", *args]  # fmt: skip
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)


def small_checkpoint(tmp_path: Path) -> Path:
    return make_test_checkpoint(
        tmp_path / "ckpt",
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=128,
    )


def cannot_start_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == CANNOT_START, result.stderr[-2000:]
    [line] = [json.loads(x) for x in result.stderr.splitlines() if "cannot start" in x]
    assert line["level"] == "ERROR"
    return str(line["msg"])


def test_an_unsupported_architecture_cannot_start(tmp_path: Path) -> None:
    checkpoint = small_checkpoint(tmp_path)
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = ["FooForCausalLM"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    message = cannot_start_line(run_engine("--model", str(checkpoint), "--data-dir", str(tmp_path)))
    assert "FooForCausalLM" in message and "is not supported" in message


def test_missing_weights_cannot_start(tmp_path: Path) -> None:
    checkpoint = small_checkpoint(tmp_path)
    for weights in checkpoint.glob("*.safetensors"):
        weights.unlink()
    message = cannot_start_line(run_engine("--model", str(checkpoint), "--data-dir", str(tmp_path)))
    assert "safetensors" in message


def test_a_missing_model_folder_cannot_start(tmp_path: Path) -> None:
    message = cannot_start_line(
        run_engine("--model", str(tmp_path / "nowhere"), "--data-dir", str(tmp_path))
    )
    assert "nowhere" in message


@pytest.mark.parametrize("args", [["--no-such-flag"], ["--max-num-seqs", "many"]])
def test_a_bad_flag_cannot_start(args: list[str]) -> None:
    result = run_engine(*args)
    assert result.returncode == CANNOT_START
    assert "error:" in result.stderr
