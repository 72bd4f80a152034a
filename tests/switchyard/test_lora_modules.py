"""``--lora-modules`` in vLLM's two forms, from flags, env and YAML."""

from __future__ import annotations

import json

import pytest

from switchyard.lora_modules import LoRAModule, parse_lora_modules
from switchyard.settings import EngineSettings, load_settings


def test_flags_take_several_modules_in_both_forms():
    settings = load_settings(
        EngineSettings,
        [
            "--enable-lora",
            "--lora-modules",
            "sql=/adapters/sql",
            '{"name": "chat", "path": "org/chat-lora", "base_model_name": "llama"}',
            "--max-loras",
            "4",
            "--max-lora-rank",
            "64",
            "--max-cpu-loras",
            "8",
        ],
    )
    assert settings.enable_lora and settings.max_loras == 4
    assert settings.max_lora_rank == 64 and settings.max_cpu_loras == 8
    assert parse_lora_modules(settings.lora_modules) == [
        LoRAModule("sql", "/adapters/sql"),
        LoRAModule("chat", "org/chat-lora", "llama"),
    ]


def test_env_and_yaml_forms(monkeypatch, tmp_path):
    monkeypatch.setenv("SWITCHYARD_LORA_MODULES", "a=/x b=/y")
    assert [m.name for m in parse_lora_modules(EngineSettings().lora_modules)] == ["a", "b"]
    monkeypatch.setenv("SWITCHYARD_LORA_MODULES", json.dumps([{"name": "c", "path": "/z"}]))
    assert parse_lora_modules(EngineSettings().lora_modules) == [LoRAModule("c", "/z")]
    monkeypatch.delenv("SWITCHYARD_LORA_MODULES")
    config = tmp_path / "s.yaml"
    config.write_text("engine:\n  lora_modules:\n    - d=/w\n    - {name: e, path: /v}\n")
    modules = parse_lora_modules(EngineSettings(config=config).lora_modules)
    assert modules == [LoRAModule("d", "/w"), LoRAModule("e", "/v")]


@pytest.mark.parametrize(
    "value, reason",
    [
        ("no-equals-sign", "expected NAME=PATH"),
        ("=/path", "needs a name and a path"),
        ('{"name": "x"', "not valid JSON"),
        ('{"name": "x", "path": "/p", "rank": 4}', "unknown keys"),
        ("a:b=/p", "may not contain ':'"),
    ],
)
def test_bad_modules_are_refused_with_the_reason(value, reason):
    with pytest.raises(SystemExit):
        load_settings(EngineSettings, ["--lora-modules", value])
    with pytest.raises(ValueError, match=reason):
        parse_lora_modules([value])


def test_a_name_given_twice_is_refused():
    with pytest.raises(ValueError, match="given twice"):
        parse_lora_modules(["a=/x", "a=/y"])
