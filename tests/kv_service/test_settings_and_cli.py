"""The KV service's settings, its process entry point, and its lines in `switchyard status`."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from switchyard.cli import format_kv_stats
from switchyard.settings import KVServiceSettings, add_settings_arguments, load_settings
from switchyard.v1 import kv_pb2
from tests.kv_service.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("spec", ["memory", "disk", "disk:/var/kv", "redis://redis:6379/1"])
def test_known_stores_are_accepted(spec: str) -> None:
    assert load_settings(KVServiceSettings, ["--kv-store", spec]).kv_store == spec


@pytest.mark.parametrize("spec", ["", "ssd", "redis:6379", "s3://bucket"])
def test_unknown_stores_are_rejected(spec: str) -> None:
    with pytest.raises(ValidationError, match="kv_store"):
        KVServiceSettings(kv_store=spec)


def test_every_setting_has_a_flag_and_a_documented_row() -> None:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, KVServiceSettings)
    flags = {flag for action in parser._actions for flag in action.option_strings}
    doc = (REPO / "docs" / "configuration.md").read_text()
    for name in KVServiceSettings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in flags
        assert f"`{flag}`" in doc, name


def test_python_dash_m_kv_service_serves_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "kv_service", "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "0", "--kv-store", "memory", "--data-dir", str(tmp_path)],
        cwd=REPO,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="switchyard.v1.KVService")
            deadline = time.monotonic() + 20
            while True:
                try:
                    status = health.Check(request, timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "the KV service did not become SERVING"
                time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
        assert process.returncode == 0
        assert b"kv service serving" in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_status_shows_each_tiers_hit_rate() -> None:
    reply = kv_pb2.StatsResponse(
        store="memory+disk:/data/kv",
        tiers=[
            kv_pb2.TierStats(tier="memory", hits=2, misses=1, hit_rate=2 / 3, blocks=2),
            kv_pb2.TierStats(
                tier="disk", misses=1, corrupt_blocks=1, bytes_used=2**30, capacity_bytes=2**34
            ),
        ],
    )
    lines = format_kv_stats(reply).splitlines()
    assert lines[0] == "KV service (memory+disk:/data/kv):"
    assert lines[1].split()[:3] == ["memory", "hit", "66.7%"]
    assert "1.00 GiB of 16.00 GiB" in lines[2]
    assert "1 corrupt" in lines[2]
