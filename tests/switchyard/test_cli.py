"""``switchyard up`` turns its knobs into the flags of the services it starts."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from switchyard.cli import (
    _engine_args,
    _gateway_args,
    build_parser,
    choose_stack_ports,
    cmd_up,
    stack_dir,
)
from switchyard.ports import PortTaken, any_free_port


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


def test_gateway_knobs_become_gateway_flags() -> None:
    args = build_parser().parse_args(
        ["up", "--routing-policy", "prefix", "--chat-format", "harmony", "--tool-call-parser",
         "hermes"]
    )  # fmt: skip
    assert _gateway_args(args) == [
        "--routing-policy", "prefix", "--chat-format", "harmony", "--tool-call-parser", "hermes"
    ]  # fmt: skip


def test_unset_gateway_knobs_pass_nothing() -> None:
    assert _gateway_args(build_parser().parse_args(["up"])) == []


def test_unknown_routing_policy_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--routing-policy", "random"])
    assert "invalid choice" in capsys.readouterr().err


def test_engine_knobs_and_engine_args_reach_every_engine() -> None:
    args = build_parser().parse_args(
        ["up", "--device", "cpu", "--engine-args", "--grammar-backend xgrammar --seed 3"]
    )
    assert _engine_args(args) == ["--grammar-backend", "xgrammar", "--seed", "3", "--device", "cpu"]


def test_lora_flags_of_up_reach_every_engine_as_vllm_spells_them() -> None:
    json_form = '{"name": "chat", "path": "/a/chat"}'
    args = build_parser().parse_args(
        ["up", "--enable-lora", "--lora-modules", "sql=/a/sql", json_form, "--max-loras", "4",
         "--max-lora-rank", "32", "--max-cpu-loras", "8"]
    )  # fmt: skip
    engine_args = _engine_args(args)
    assert engine_args == [
        "--max-loras", "4", "--max-lora-rank", "32", "--max-cpu-loras", "8", "--enable-lora",
        "--lora-modules", "sql=/a/sql", json_form,
    ]  # fmt: skip
    from switchyard.settings import EngineSettings, load_settings

    settings = load_settings(EngineSettings, engine_args)
    assert settings.enable_lora and settings.lora_modules == ["sql=/a/sql", json_form]


def test_parallel_flags_of_up_reach_every_engine_as_vllm_spells_them() -> None:
    args = build_parser().parse_args(["up", "-tp", "2", "--enable-expert-parallel"])
    engine_args = _engine_args(args)
    assert engine_args == ["--tensor-parallel-size", "2", "--enable-expert-parallel"]
    from switchyard.settings import EngineSettings, load_settings

    settings = load_settings(EngineSettings, [*engine_args, "--data-parallel-size", "1"])
    assert settings.tensor_parallel_size == 2 and settings.enable_expert_parallel
    assert settings.data_parallel_size == 1


def test_parallel_flags_pass_through_engine_args_and_yaml(tmp_path) -> None:
    from switchyard.settings import EngineSettings, load_settings

    settings = load_settings(
        EngineSettings, ["--tensor-parallel-size", "4", "--enable-expert-parallel"]
    )
    assert (settings.tensor_parallel_size, settings.enable_expert_parallel) == (4, True)
    config = tmp_path / "switchyard.yaml"
    config.write_text("engine:\n  tensor_parallel_size: 2\n  enable_expert_parallel: true\n")
    settings = load_settings(EngineSettings, ["--config", str(config)])
    assert (settings.tensor_parallel_size, settings.enable_expert_parallel) == (2, True)


def test_up_refuses_a_missing_settings_file(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(
        ["up", "--data-dir", str(tmp_path), "--config", str(tmp_path / "missing.yaml")]
    )
    assert cmd_up(args) == 1
    assert "missing.yaml does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag", ["--controller-port", "--kv-port", "--kv-metrics-port", "--engine-base-port"]
)
def test_up_refuses_a_taken_port_given_by_flag_naming_the_flag(
    tmp_path: Path, taken_port: int, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(
        ["up", "--data-dir", str(tmp_path), "--port", str(any_free_port("127.0.0.1")),
         flag, str(taken_port)]
    )  # fmt: skip
    assert cmd_up(args) == 1
    assert f"({flag} {taken_port}) is taken" in capsys.readouterr().err
    assert not (tmp_path / "stacks").exists()  # refused before starting anything


def test_up_refuses_a_taken_gateway_port(
    tmp_path: Path, taken_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["up", "--data-dir", str(tmp_path), "--port", str(taken_port)])
    assert cmd_up(args) == 1
    assert f"port {taken_port} for the gateway (--port {taken_port}) is taken" in (
        capsys.readouterr().err
    )


def test_each_gateway_port_has_its_own_stack_folder(tmp_path: Path) -> None:
    assert stack_dir(tmp_path, 8000) != stack_dir(tmp_path, 8001)
    assert stack_dir(tmp_path, 8000).parent.parent == tmp_path


def test_status_shows_hit_rates_per_tier() -> None:
    from switchyard.cli import format_status
    from switchyard.v1 import common_pb2, controller_pb2

    load = common_pb2.ReplicaLoad(
        prefix_cache_queries=1000,
        prefix_hit_rate=0.4,
        host_hit_tokens=100,
        remote_hit_tokens=250,
    )
    replica = common_pb2.Replica(
        replica_id="engine-0",
        address="127.0.0.1:50100",
        state=common_pb2.REPLICA_STATE_READY,
        load=load,
    )
    table = format_status(controller_pb2.ListReplicasResponse(replicas=[replica]))
    header, row = table.splitlines()[-2:]
    assert header.split()[-6:] == ["PREFIX", "HIT", "HOST", "HIT", "REMOTE", "HIT"]
    assert row.split()[-3:] == ["40.0%", "10.0%", "25.0%"]


def test_status_shows_the_mean_acceptance_length_of_speculating_replicas() -> None:
    from switchyard.cli import format_status
    from switchyard.v1 import common_pb2, controller_pb2

    replicas = [
        common_pb2.Replica(replica_id="engine-0", load=common_pb2.ReplicaLoad()),
        common_pb2.Replica(
            replica_id="engine-1", load=common_pb2.ReplicaLoad(spec_acceptance_length=2.75)
        ),
    ]
    header, *rows = format_status(
        controller_pb2.ListReplicasResponse(replicas=replicas)
    ).splitlines()
    assert header.split()[-2:] == ["SPEC", "ACCEPT"]
    assert rows[0].split()[-1] == "0.00"
    assert rows[1].split()[-1] == "2.75"


def test_status_shows_the_adapters_of_each_replica() -> None:
    from switchyard.cli import format_status
    from switchyard.v1 import common_pb2, controller_pb2

    info = common_pb2.LoRAAdapterInfo
    lora = common_pb2.Replica(
        replica_id="engine-0",
        state=common_pb2.REPLICA_STATE_READY,
        max_loras=2,
        adapters=["sql"],
        placed_adapters=["sql", "chat"],
        lora_adapters=[info(name="sql", resident=True), info(name="chat"), info(name="math")],
    )
    plain = common_pb2.Replica(replica_id="engine-1", state=common_pb2.REPLICA_STATE_READY)
    table = format_status(controller_pb2.ListReplicasResponse(replicas=[lora, plain]))
    header, first, second = table.splitlines()[-3:]
    assert header.split()[-3:] == ["LORA", "SLOTS", "ADAPTERS"]
    assert first.split()[-2:] == ["1/2", "chat^,math,sql*^"]
    assert second.split()[-2:] == ["-", "-"]
    no_lora = format_status(controller_pb2.ListReplicasResponse(replicas=[plain]))
    assert "ADAPTERS" not in no_lora


def test_internal_ports_never_repeat_the_gateway_port() -> None:
    """``--port 50051``: the controller's default is free until the gateway binds it."""
    gateway_port = any_free_port("127.0.0.1")
    args = build_parser().parse_args(
        ["up", "--port", str(gateway_port), "--controller-port", str(gateway_port)]
    )
    with pytest.raises(PortTaken, match="--controller-port"):
        choose_stack_ports(args)
    args = build_parser().parse_args(["up", "--port", str(gateway_port)])
    ports = choose_stack_ports(args)
    chosen = [ports.gateway, ports.controller, ports.kv, ports.kv_metrics]
    assert len(set(chosen)) == 4


def test_max_queued_requests_reaches_every_engine() -> None:
    args = build_parser().parse_args(["up", "--max-queued-requests", "7"])
    assert _engine_args(args)[-2:] == ["--max-queued-requests", "7"]
