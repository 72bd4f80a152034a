"""The engine service maps every engine knob of ``EngineSettings`` onto ``EngineConfig``."""

from __future__ import annotations

import dataclasses

from engine_service.engine import EngineConfig
from engine_service.mappings import engine_config_from_settings
from switchyard.settings import EngineSettings

# EngineConfig fields that are not settings of their own: the model path is resolved by the
# service, offload is on when a host tier or a KV service is given, events are always on.
# ``lora_modules`` is parsed from vLLM's NAME=PATH / JSON forms into (name, path) pairs.
DERIVED = {
    "model",
    "revision",
    "enable_kv_offload",
    "enable_kv_events",
    "kv_remote_retry_s",
    "lora_modules",
}

NON_DEFAULT = {
    "dtype": "float32",
    "device": "cpu",
    "max_model_len": 256,
    "block_size": 32,
    "num_kv_blocks": 64,
    "kv_cache_memory_bytes": 1 << 20,
    "gpu_memory_utilization": 0.5,
    "enable_prefix_caching": False,  # offload needs it: kv_offload_host_bytes stays 0 here
    "max_num_batched_tokens": 512,
    "max_num_seqs": 8,
    "long_prefill_token_threshold": 64,
    "enable_chunked_prefill": False,
    "attention_backend": "sdpa",
    "enable_cuda_graphs": False,
    "cuda_graph_max_batch": 16,
    "kv_offload_host_bytes": 0,
    "kv_write_through": False,
    "seed": 7,
    "grammar_backend": "xgrammar",
    "enable_jump_forward": False,
    "async_scheduling": False,
    "speculative_config": '{"method": "ngram", "num_speculative_tokens": 2}',
    "enable_lora": True,
    "max_loras": 3,
    "max_lora_rank": 8,
    "max_cpu_loras": 5,
    "mm_encoder_cache_gb": 0.25,
}

# Parallel knobs: checked on their own, as data parallelism above 1 refuses speculation
# (in NON_DEFAULT), and above 1 with tensor parallelism outright.
PARALLEL = {"tensor_parallel_size": 2, "enable_expert_parallel": True, "data_parallel_size": 1}


def test_every_engine_config_knob_is_a_setting() -> None:
    knobs = {f.name for f in dataclasses.fields(EngineConfig)} - DERIVED
    assert knobs <= set(EngineSettings.model_fields), knobs - set(EngineSettings.model_fields)
    assert knobs == set(NON_DEFAULT) | set(PARALLEL)


def test_settings_reach_the_engine_config() -> None:
    config = engine_config_from_settings(EngineSettings(**NON_DEFAULT), "/models/m")
    for name, value in NON_DEFAULT.items():
        assert getattr(config, name) == value, name
    assert config.model == "/models/m"


def test_parallel_settings_reach_the_engine_config() -> None:
    config = engine_config_from_settings(EngineSettings(device="cpu", **PARALLEL), "/models/m")
    for name, value in PARALLEL.items():
        assert getattr(config, name) == value, name
    assert config.world_size == 2


def test_a_parallel_engine_offloads_to_the_kv_service_that_up_points_it_at() -> None:
    settings = EngineSettings(
        device="cpu", tensor_parallel_size=2, data_parallel_size=2, kv_service_address="kv:1"
    )
    config = engine_config_from_settings(settings, "/models/m")
    assert config.enable_kv_offload and config.kv_offload_host_bytes >= 64 << 20


def test_setting_defaults_equal_engine_config_defaults() -> None:
    config = engine_config_from_settings(EngineSettings(device="cpu"), "/models/m")
    for field in dataclasses.fields(EngineConfig):
        if field.name in DERIVED or field.name in ("device", "kv_offload_host_bytes"):
            continue
        assert getattr(config, field.name) == field.default, field.name


def test_a_host_tier_turns_offload_on() -> None:
    config = engine_config_from_settings(
        EngineSettings(device="cpu", kv_offload_host_bytes=128 << 20), "/models/m"
    )
    assert config.enable_kv_offload
    assert config.kv_offload_host_bytes == 128 << 20


def test_lora_modules_reach_the_engine_config_as_name_path_pairs() -> None:
    settings = EngineSettings(
        enable_lora=True, lora_modules=["sql=/a/sql", '{"name": "chat", "path": "org/chat"}']
    )
    config = engine_config_from_settings(settings, "/models/m")
    assert config.lora_modules == (("sql", "/a/sql"), ("chat", "org/chat"))
