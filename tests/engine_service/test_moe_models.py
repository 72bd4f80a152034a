"""Mixture-of-experts families: which layers route, and that every expert's weights load.

Token-for-token parity with ``transformers`` is in test_parity.py (the ``mixtral``,
``qwen2_moe`` and ``qwen3_moe`` families of conftest.py); these check the pieces a parity
failure would not name.
"""

from __future__ import annotations

import json

import pytest
import torch

from engine_service.engine.attention.sdpa import SdpaBackend
from engine_service.layers.mlp import GatedMLP
from engine_service.models import load_model
from engine_service.models.qwen2_moe import Qwen2MoeForCausalLM
from engine_service.models.sparse_moe import SparseMoeBlock
from tests.engine_service.conftest import make_checkpoint


def test_qwen_sparse_layers_follow_decoder_sparse_step_and_mlp_only_layers():
    raw = {
        "architectures": ["Qwen2MoeForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [3],
    }
    config = Qwen2MoeForCausalLM.parse_config(raw)
    # Sparse where (i + 1) % 2 == 0, except layer 3.
    assert config.moe.sparse_layers == [False, True, False, False, False, True]
    assert config.moe.shared_expert_intermediate_size == 24 and config.moe.shared_expert_gate
    assert config.moe.renormalize is False  # norm_topk_prob defaults off
    assert config.qkv_bias and not config.o_bias


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_every_expert_loads_from_the_checkpoint(tmp_path, family):
    reference = make_checkpoint(tmp_path, family)
    ours, config, _ = load_model(str(tmp_path), SdpaBackend())
    assert config.moe is not None
    for i, (our_layer, their_layer) in enumerate(zip(ours.model.layers, reference.model.layers)):
        theirs = getattr(their_layer, "block_sparse_moe", None) or their_layer.mlp
        if not config.moe.sparse_layers[i]:
            assert isinstance(our_layer.mlp, GatedMLP)
            continue
        block = our_layer.mlp
        assert isinstance(block, SparseMoeBlock)
        torch.testing.assert_close(block.gate.weight, theirs.gate.weight, rtol=0, atol=0)
        torch.testing.assert_close(block.experts.w13, theirs.experts.gate_up_proj, rtol=0, atol=0)
        torch.testing.assert_close(block.experts.w2, theirs.experts.down_proj, rtol=0, atol=0)
        if family == "qwen2_moe":
            assert block.shared_expert is not None and block.shared_expert_gate is not None
    if family == "qwen2_moe":
        assert isinstance(ours.model.layers[1].mlp, GatedMLP)  # mlp_only_layers=[1]


def test_a_checkpoint_missing_an_expert_names_it(tmp_path):
    make_checkpoint(tmp_path, "mixtral")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.2.block_sparse_moe.experts.5.w3.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.2.mlp.experts.w13 \(shards \(5, 'up'\)\)"):
        load_model(str(tmp_path), SdpaBackend())


def test_mixtral_window_is_on_every_layer(tmp_path):
    make_checkpoint(tmp_path, "mixtral")
    _, config, _ = load_model(str(tmp_path), SdpaBackend())
    raw = json.loads((tmp_path / "config.json").read_text())
    assert config.sliding_windows == [raw["sliding_window"]] * config.num_layers


def test_gpt_oss_interleaved_stacked_experts_load_into_gate_then_up(tmp_path):
    reference = make_checkpoint(tmp_path, "gpt_oss")
    ours, config, _ = load_model(str(tmp_path), SdpaBackend())
    assert config.sliding_windows == [12, None, 12]
    assert config.rope_scaling["rope_type"] == "yarn"
    for our_layer, their_layer in zip(ours.model.layers, reference.model.layers):
        experts, theirs = our_layer.mlp.experts, their_layer.mlp.experts
        gate_up = theirs.gate_up_proj.transpose(1, 2)  # [E, 2I, H], gate and up interleaved
        torch.testing.assert_close(experts.w13, torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], 1))
        torch.testing.assert_close(experts.w2, theirs.down_proj.transpose(1, 2))
        bias = theirs.gate_up_proj_bias
        torch.testing.assert_close(experts.w13_bias, torch.cat([bias[:, 0::2], bias[:, 1::2]], 1))
        torch.testing.assert_close(experts.w2_bias, theirs.down_proj_bias)
        torch.testing.assert_close(our_layer.self_attn.sinks, their_layer.self_attn.sinks)
        torch.testing.assert_close(our_layer.mlp.gate.bias, their_layer.mlp.router.bias)


def test_gpt_oss_quantized_checkpoint_is_refused_clearly(tmp_path):
    make_checkpoint(tmp_path, "gpt_oss")
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="mxfp4"):
        load_model(str(tmp_path), SdpaBackend())


def test_a_backend_without_sinks_is_refused_for_gpt_oss(tmp_path):
    make_checkpoint(tmp_path, "gpt_oss")

    class NoSinks(SdpaBackend):
        name = "no-sinks"
        supports_sinks = False

    with pytest.raises(ValueError, match="no-sinks attention backend does not support"):
        load_model(str(tmp_path), NoSinks())


class _NoSinks(SdpaBackend):
    name = "no-sinks"
    supports_sinks = False


@pytest.fixture
def auto_prefers_a_backend_without_sinks(monkeypatch):
    """``auto`` picks ``no-sinks`` first (as it picks Triton first on CUDA), SDPA after it."""
    from engine_service.engine import attention

    monkeypatch.setitem(attention._REGISTRY, "no-sinks", lambda: _NoSinks)
    monkeypatch.setattr(attention, "_auto_order", lambda device: ["no-sinks", "sdpa"])


def test_auto_backend_falls_back_with_a_warning_when_it_lacks_sinks(
    tmp_path, auto_prefers_a_backend_without_sinks, caplog
):
    from engine_service.engine import EngineConfig, LLMEngine

    make_checkpoint(tmp_path, "gpt_oss")
    with caplog.at_level("WARNING", logger="engine_service.engine.attention"):
        engine = LLMEngine(
            EngineConfig(model=str(tmp_path), dtype="float32", num_kv_blocks=16, block_size=4)
        )
    assert type(engine.runner.backend) is SdpaBackend
    assert "no-sinks lacks supports_sinks that the model needs; using sdpa" in caplog.text


def test_auto_backend_keeps_its_first_pick_for_a_model_without_sinks(
    tmp_path, auto_prefers_a_backend_without_sinks, caplog
):
    from engine_service.engine import EngineConfig, LLMEngine

    make_checkpoint(tmp_path, "mixtral")
    with caplog.at_level("WARNING", logger="engine_service.engine.attention"):
        engine = LLMEngine(
            EngineConfig(model=str(tmp_path), dtype="float32", num_kv_blocks=16, block_size=4)
        )
    assert type(engine.runner.backend) is _NoSinks
    assert "lacks" not in caplog.text


def test_a_named_backend_without_sinks_is_refused_not_replaced(
    tmp_path, auto_prefers_a_backend_without_sinks
):
    from engine_service.engine import EngineConfig, LLMEngine

    make_checkpoint(tmp_path, "gpt_oss")
    config = EngineConfig(
        model=str(tmp_path),
        dtype="float32",
        num_kv_blocks=16,
        block_size=4,
        attention_backend="no-sinks",
    )
    with pytest.raises(ValueError, match="no-sinks attention backend does not support"):
        LLMEngine(config)
