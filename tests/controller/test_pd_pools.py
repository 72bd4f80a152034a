"""Disaggregation pools in the controller: prefill and decode engines are pools of their own
that scale independently, list their desired sizes, and start engines with their role."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import pytest

from controller.local_backend import LocalEngineSpec, LocalProcessBackend
from controller.plan import RestartPolicy
from controller.reconciler import DECODE_POOL, ENGINE_POOL, PREFILL_POOL, Reconciler
from controller.registry import ReplicaRegistry
from controller.server import SERVICE_NAME, ControllerServicer, RouteFeed
from switchyard.cli import format_status
from switchyard.grpc_utils import create_server, insecure_channel
from switchyard.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from tests.controller.fakes import FakeBackend, FakeClock


def test_each_pool_scales_on_its_own_and_names_its_replicas() -> None:
    async def main() -> None:
        clock = FakeClock()
        registry = ReplicaRegistry(6.0, 30.0, clock=clock)
        pools = {
            name: Reconciler(
                registry, FakeBackend(clock), size, RestartPolicy(), clock=clock, pool=name
            )
            for name, size in ((ENGINE_POOL, 0), (PREFILL_POOL, 1), (DECODE_POOL, 2))
        }
        server = create_server("127.0.0.1", 0, [SERVICE_NAME])
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(
            ControllerServicer(registry, RouteFeed(), pools, heartbeat_interval_s=0.5),
            server.server,
        )
        await server.start()
        channel = insecure_channel(f"127.0.0.1:{server.port}")
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        try:
            reply = await stub.Scale(controller_pb2.ScaleRequest(pool=PREFILL_POOL, replicas=3))
            assert (reply.previous, reply.desired) == (1, 3)
            for pool in pools.values():
                await pool.reconcile_once()
            listed = await stub.ListReplicas(controller_pb2.ListReplicasRequest())
            assert dict(listed.desired) == {ENGINE_POOL: 0, PREFILL_POOL: 3, DECODE_POOL: 2}
            assert sorted(r.replica_id for r in listed.replicas) == [
                "decode-engine-0",
                "decode-engine-1",
                "prefill-engine-0",
                "prefill-engine-1",
                "prefill-engine-2",
            ]
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await stub.Scale(controller_pb2.ScaleRequest(pool="prefill", replicas=1))
            assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "engines, prefill-engines, decode-engines" in unknown.value.details()
        finally:
            await channel.close()
            await server.stop(grace_s=None)

    asyncio.run(main())


def test_a_pool_starts_its_engines_with_its_role_on_its_own_ports(tmp_path: Path) -> None:
    spec = LocalEngineSpec(
        command=[sys.executable, "-c", "import time; time.sleep(60)"],
        model="m",
        controller_address="127.0.0.1:1",
        data_dir=tmp_path,
        base_port=41000,
        base_metrics_port=42000,
        pool=PREFILL_POOL,
        role="prefill",
    )
    backend = LocalProcessBackend(spec, stop_grace_s=2.0)
    asyncio.run(backend.start("prefill-engine-0", 0))
    (instance,) = asyncio.run(backend.observe())
    process = backend._processes[instance.replica_id]
    try:
        argv = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--role") + 1] == b"prefill"
        assert process.address != "127.0.0.1:41000"  # the prefill pool's range starts later
        assert (tmp_path / "logs" / "prefill-engine-0.log").exists()
    finally:
        asyncio.run(backend.close())
    assert (tmp_path / f"{PREFILL_POOL}.json").exists()


def test_status_shows_roles_and_hand_off_figures() -> None:
    decode = common_pb2.Replica(
        replica_id="decode-engine-0",
        address="127.0.0.1:50180",
        role=common_pb2.REPLICA_ROLE_DECODE,
        state=common_pb2.REPLICA_STATE_READY,
        load=common_pb2.ReplicaLoad(
            kv_handoffs_total=3, kv_handoff_bytes_total=3 << 20, kv_handoff_seconds_total=0.25
        ),
    )
    prefill = common_pb2.Replica(
        replica_id="prefill-engine-0",
        role=common_pb2.REPLICA_ROLE_PREFILL,
        state=common_pb2.REPLICA_STATE_READY,
    )
    table = format_status(
        controller_pb2.ListReplicasResponse(
            replicas=[decode, prefill], desired={PREFILL_POOL: 1, DECODE_POOL: 1}
        )
    )
    lines = table.splitlines()
    assert lines[0] == "decode-engines: 1 desired, prefill-engines: 1 desired"
    assert "ROLE" in lines[1] and "HANDOFFS" in lines[1] and "HANDOFF MiB" in lines[1]
    assert lines[2].split()[2] == "decode" and lines[2].split()[-3:] == ["3", "3.0", "0.25"]
    assert lines[3].split()[1:3] == ["-", "prefill"]  # no address yet
