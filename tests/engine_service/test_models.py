"""Checkpoint loading: the registry, sharded weights, dtypes, tied embeddings, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from engine_service.engine import EngineConfig, LLMEngine, SamplingParams
from engine_service.engine.attention.sdpa import SdpaBackend
from engine_service.models import SUPPORTED_ARCHITECTURES, load_model
from tests.engine_service.conftest import make_checkpoint

# Our stacked projections and the checkpoint tensors they are built from, in order.
STACKED_PROJECTIONS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def test_unsupported_architecture_names_what_is_supported(tmp_path):
    make_checkpoint(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        load_model(str(tmp_path), SdpaBackend())
    assert "FalconForCausalLM" in str(err.value)
    for name in SUPPORTED_ARCHITECTURES:
        assert name in str(err.value)


def test_sharded_checkpoint_loads_every_shard(tmp_path):
    reference = make_checkpoint(tmp_path / "one", "llama")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1

    ours, _, _ = load_model(str(tmp_path / "sharded"), SdpaBackend())
    theirs = reference.state_dict()
    for name, tensor in ours.state_dict().items():
        for stacked, parts in STACKED_PROJECTIONS.items():
            if f".{stacked}." in name:
                expected = torch.cat([theirs[name.replace(stacked, part)] for part in parts])
                break
        else:
            expected = theirs[name]
        assert torch.equal(tensor, expected), name


def test_tied_embeddings_share_one_tensor(tmp_path):
    make_checkpoint(tmp_path, "qwen3")
    model, config, _ = load_model(str(tmp_path), SdpaBackend())
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize(
    ("dtype", "expected"), [("bfloat16", torch.bfloat16), ("float16", torch.float16)]
)
def test_half_precision_loads_and_generates_close_to_fp32(tmp_path, dtype, expected):
    make_checkpoint(tmp_path, "llama")
    fp32 = LLMEngine(EngineConfig(model=str(tmp_path), dtype="float32", num_kv_blocks=64))
    half = LLMEngine(EngineConfig(model=str(tmp_path), dtype=dtype, num_kv_blocks=64))
    assert half.kv_cache.dtype == expected
    assert next(half.model.parameters()).dtype == expected
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=0)
    prompt = [5, 17, 99, 140, 33, 8]
    [a] = [o for o in fp32.stream("a", prompt, params)]
    [b] = [o for o in half.stream("b", prompt, params)]
    # One step of a random model: the half-precision logprob stays near fp32's.
    assert abs(a.new_logprobs[0].logprob - b.new_logprobs[0].logprob) < 0.1


def test_missing_folder_is_a_clear_error():
    with pytest.raises(FileNotFoundError):
        load_model("./no/such/model", SdpaBackend())


def test_max_model_len_beyond_the_model_is_rejected(tmp_path):
    make_checkpoint(tmp_path, "llama")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LLMEngine(EngineConfig(model=str(tmp_path), max_model_len=10_000, num_kv_blocks=8))
