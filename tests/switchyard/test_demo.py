"""The demo checkpoint is a loadable Llama with a real tokenizer, built once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from switchyard.demo import ensure_demo_model, make_test_checkpoint, resolve_model


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_checkpoint(
        tmp_path_factory.mktemp("demo") / "ckpt",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    )


def test_vocab_and_eos_are_consistent(small: Path) -> None:
    from transformers import AutoTokenizer

    config = json.loads((small / "config.json").read_text())
    generation = json.loads((small / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(small)

    assert config["vocab_size"] == len(tokenizer)
    assert 2000 <= len(tokenizer) <= 4096
    assert config["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert generation["eos_token_id"] == [
        tokenizer.convert_tokens_to_ids("<|eot_id|>"),
        tokenizer.convert_tokens_to_ids("<|end_of_text|>"),
    ]
    assert tokenizer.eos_token_id == config["eos_token_id"]


def test_tokenizer_is_byte_level_bpe_and_round_trips(small: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(small)
    text = "Hello, world! The weather is sunny. Ünïcode ✓ 1234"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) < len(text.encode())  # merges were learned
    assert tokenizer.decode(ids) == text


def test_chat_template_is_llama3_style(small: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(small)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    config = json.loads((small / "tokenizer_config.json").read_text())
    assert "chat_template" in config


def test_weights_load_into_transformers(small: Path) -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(small)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size)


def test_same_seed_same_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
    )
    a = load_file(make_test_checkpoint(tmp_path / "a", **kwargs) / "model.safetensors")
    b = load_file(make_test_checkpoint(tmp_path / "b", **kwargs) / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_ensure_demo_model_builds_once(tmp_path: Path) -> None:
    path = ensure_demo_model(tmp_path)
    assert "random" in (path / "README.md").read_text()
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (256, 4)
    stamp = (path / "model.safetensors").stat().st_mtime_ns

    assert ensure_demo_model(tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no staging left behind
    assert resolve_model("demo", tmp_path) == str(path)
    assert resolve_model("/models/x", tmp_path) == "/models/x"
