"""Settings come from flags over env vars over the YAML file over defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from switchyard.settings import (
    ControllerSettings,
    EngineSettings,
    GatewaySettings,
    ToolServiceSettings,
    add_settings_arguments,
    load_settings,
    settings_from_namespace,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("SWITCHYARD_"):
            monkeypatch.delenv(name)


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    settings = load_settings(EngineSettings, [])
    assert settings.port == 50100
    assert settings.metrics_port == 9100
    assert settings.controller_address == "127.0.0.1:50051"
    assert settings.enable_prefix_caching is True
    assert settings.data_dir == Path.home() / ".cache" / "switchyard"
    assert load_settings(ControllerSettings, []).port == 50051
    assert load_settings(GatewaySettings, []).port == 8000


def test_flags_beat_env_beat_yaml_beat_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_yaml(tmp_path, "port: 1111\nblock_size: 32\nmax_num_seqs: 7\n")
    monkeypatch.setenv("SWITCHYARD_CONFIG", str(config))
    monkeypatch.setenv("SWITCHYARD_PORT", "2222")
    monkeypatch.setenv("SWITCHYARD_BLOCK_SIZE", "64")

    settings = load_settings(EngineSettings, ["--port", "3333"])

    assert settings.port == 3333  # flag over env and YAML
    assert settings.block_size == 64  # env over YAML
    assert settings.max_num_seqs == 7  # YAML over default
    assert settings.max_num_batched_tokens == 2048  # default


def test_config_flag_names_the_yaml_file(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "served_model_name: from-yaml\n")
    settings = load_settings(EngineSettings, ["--config", str(config)])
    assert settings.served_model_name == "from-yaml"


def test_boolean_flags_have_a_negative_form() -> None:
    assert (
        load_settings(EngineSettings, ["--no-enable-prefix-caching"]).enable_prefix_caching is False
    )


def test_list_fields_from_flags_env_and_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings(GatewaySettings, ["--api-keys", "k1, k2"]).api_keys == ["k1", "k2"]
    monkeypatch.setenv("SWITCHYARD_ENGINE_ARGS", "--device cpu --served-model-name 'a b'")
    controller = load_settings(ControllerSettings, [])
    assert controller.engine_args == ["--device", "cpu", "--served-model-name", "a b"]
    monkeypatch.delenv("SWITCHYARD_ENGINE_ARGS")
    config = write_yaml(tmp_path, "api_keys: [x, y]\n")
    assert load_settings(GatewaySettings, ["--config", str(config)]).api_keys == ["x", "y"]


def test_bad_value_exits_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        load_settings(EngineSettings, ["--port", "not-a-port"])
    assert exited.value.code == 2
    assert "port" in capsys.readouterr().err


def test_missing_yaml_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        load_settings(EngineSettings, ["--config", str(tmp_path / "absent.yaml")])


def test_every_field_has_a_flag() -> None:
    for settings_cls in (EngineSettings, ControllerSettings, GatewaySettings, ToolServiceSettings):
        parser = argparse.ArgumentParser()
        add_settings_arguments(parser, settings_cls)
        flags = {flag for action in parser._actions for flag in action.option_strings}
        for name in settings_cls.model_fields:
            assert "--" + name.replace("_", "-") in flags


def test_namespace_with_foreign_arguments() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    add_settings_arguments(parser, ControllerSettings)
    namespace = parser.parse_args(["up", "--engines", "3"])
    assert settings_from_namespace(ControllerSettings, namespace).engines == 3


def test_shared_yaml_file_gives_each_service_its_section(tmp_path: Path) -> None:
    config = write_yaml(
        tmp_path,
        "engine:\n  port: 50200\ncontroller:\n  port: 50052\n  engines: 2\n"
        "gateway:\n  port: 8080\n",
    )
    argv = ["--config", str(config)]
    assert load_settings(EngineSettings, argv).port == 50200
    controller = load_settings(ControllerSettings, argv)
    assert (controller.port, controller.engines) == (50052, 2)
    assert load_settings(GatewaySettings, argv).port == 8080


def test_configuration_doc_lists_every_field() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    for settings_cls in (EngineSettings, ControllerSettings, GatewaySettings, ToolServiceSettings):
        for name in settings_cls.model_fields:
            assert f"`--{name.replace('_', '-')}`" in doc, name
            assert f"`SWITCHYARD_{name.upper()}`" in doc, name


def test_a_misspelt_yaml_key_is_refused_by_name(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "engine:\n  max_num_seq: 8\n")
    with pytest.raises(ValueError, match="'max_num_seq' in the engine: section"):
        EngineSettings(config=config)
    flat = write_yaml(tmp_path, "prot: 8080\n")
    with pytest.raises(ValueError, match="unknown setting 'prot'"):
        GatewaySettings(config=flat)


def test_a_key_of_another_service_in_a_shared_flat_file_is_accepted(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "port: 8080\napi_keys: [k]\nnum_kv_blocks: 64\n")
    assert EngineSettings(config=config).num_kv_blocks == 64
    assert GatewaySettings(config=config).api_keys == ["k"]


def test_a_misspelt_env_var_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHYARD_MAX_NUM_SEQ", "8")
    with pytest.raises(ValueError, match="SWITCHYARD_MAX_NUM_SEQ"):
        EngineSettings()


def test_env_vars_of_other_services_and_the_stack_id_are_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SWITCHYARD_API_KEYS", "k")  # a gateway setting, seen by an engine
    monkeypatch.setenv("SWITCHYARD_UP_ID", "abc")
    assert EngineSettings().port == 50100


def test_load_settings_exits_with_the_unknown_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_yaml(tmp_path, "gateway:\n  routing_polcy: prefix\n")
    with pytest.raises(SystemExit):
        load_settings(GatewaySettings, ["--config", str(config)])
    assert "routing_polcy" in capsys.readouterr().err
