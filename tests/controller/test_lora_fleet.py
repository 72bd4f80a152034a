"""LoRA across the fleet through the controller, with real engines in-process: a bad
adapter is refused with the engine's reason and loaded nowhere; a good one reaches every
replica, its placement and the routing table; a replica that joins later catches up; an
unload removes it everywhere."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import torch

from controller.registry import ReplicaRegistry
from controller.server import SERVICE_NAME, ControllerServicer, RouteFeed
from engine_service.server import EngineServer
from switchyard.demo import make_test_checkpoint
from switchyard.grpc_utils import create_server, insecure_channel
from switchyard.v1 import controller_pb2, controller_pb2_grpc, engine_pb2, engine_pb2_grpc
from tests.engine_service.test_server import engine_settings
from tests.lora_support import make_peft_adapter


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("fleet")
    checkpoint = make_test_checkpoint(
        root / "tiny",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
    )
    base = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return checkpoint, {
        "sql": make_peft_adapter(base, root / "sql", 1, r=4, target_modules=["q_proj"]),
        "huge": make_peft_adapter(base, root / "huge", 2, r=32, target_modules=["q_proj"]),
    }


async def _until(condition, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def _engine_adapters(engine: EngineServer) -> set[str]:
    async with insecure_channel(f"127.0.0.1:{engine.port}") as channel:
        stats = await engine_pb2_grpc.EngineServiceStub(channel).GetStats(
            engine_pb2.GetStatsRequest(), timeout=5
        )
    return {a.name for a in stats.lora_adapters}


def test_loads_and_unloads_reach_the_whole_fleet(world):
    checkpoint, folders = world

    async def main() -> None:
        registry = ReplicaRegistry(6.0, 30.0, on_change=(feed := RouteFeed()).notify)
        server = create_server("127.0.0.1", 0, [SERVICE_NAME])
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(
            ControllerServicer(registry, feed, None, heartbeat_interval_s=0.1), server.server
        )
        await server.start()
        await server.set_serving(True)
        address = f"127.0.0.1:{server.port}"

        def engine() -> EngineServer:
            return EngineServer(
                engine_settings(checkpoint, address, enable_lora=True, max_loras=2, max_lora_rank=8)
            )

        engines = [engine(), engine()]
        channel = insecure_channel(address)
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        try:
            for e in engines:
                await e.start()
            await _until(lambda: len(registry.replicas()) == 2)

            bad = engine_pb2.LoadLoRAAdapterRequest(
                lora_name="huge", lora_path=str(folders["huge"])
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.LoadLoRAAdapter(bad, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "exceeds --max-lora-rank 8" in info.value.details()
            assert [await _engine_adapters(e) for e in engines] == [set(), set()]

            good = engine_pb2.LoadLoRAAdapterRequest(lora_name="sql", lora_path=str(folders["sql"]))
            await stub.LoadLoRAAdapter(good, timeout=30)
            assert [await _engine_adapters(e) for e in engines] == [{"sql"}, {"sql"}]
            table = registry.routing_table()
            assert all([a.name for a in r.lora_adapters] == ["sql"] for r in table.replicas)
            assert sum("sql" in r.placed_adapters for r in table.replicas) >= 1

            # A replica that registers after the load gets the adapter too.
            late = engine()
            engines.append(late)
            await late.start()
            await _until(lambda: len(registry.replicas()) == 3)
            await _until(
                lambda: "sql" in {a.name for a in registry.get(late.replica_id).lora_adapters}
            )
            assert await _engine_adapters(late) == {"sql"}

            unload = engine_pb2.UnloadLoRAAdapterRequest(lora_name="sql")
            await stub.UnloadLoRAAdapter(unload, timeout=30)
            assert [await _engine_adapters(e) for e in engines] == [set(), set(), set()]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.UnloadLoRAAdapter(unload, timeout=30)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            listed = await stub.ListReplicas(controller_pb2.ListReplicasRequest(), timeout=5)
            assert all(r.max_loras == 2 for r in listed.replicas)
        finally:
            await channel.close()
            for e in engines:
                await e.stop(grace_s=0.5)
            await server.stop(grace_s=None)

    asyncio.run(main())


def test_runtime_adapters_outlive_a_controller_restart(world, tmp_path):
    """A controller that starts again reads back the adapters loaded at runtime (its state
    file) and gives them to the engines that register with it; an unload is remembered too."""
    from controller.lora_fleet import LoRAFleet

    checkpoint, folders = world
    state = tmp_path / "lora_adapters.json"

    async def controller():
        registry = ReplicaRegistry(6.0, 30.0, on_change=(feed := RouteFeed()).notify)
        server = create_server("127.0.0.1", 0, [SERVICE_NAME])
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(
            ControllerServicer(
                registry, feed, None, heartbeat_interval_s=0.1, lora=LoRAFleet(registry, state)
            ),
            server.server,
        )
        await server.start()
        await server.set_serving(True)
        return registry, server, f"127.0.0.1:{server.port}"

    def engine(address: str) -> EngineServer:
        return EngineServer(
            engine_settings(checkpoint, address, enable_lora=True, max_loras=2, max_lora_rank=8)
        )

    async def main() -> None:
        registry, server, address = await controller()
        first = engine(address)
        await first.start()
        try:
            await _until(lambda: len(registry.replicas()) == 1)
            async with insecure_channel(address) as channel:
                await controller_pb2_grpc.ControllerServiceStub(channel).LoadLoRAAdapter(
                    engine_pb2.LoadLoRAAdapterRequest(
                        lora_name="sql", lora_path=str(folders["sql"])
                    ),
                    timeout=30,
                )
        finally:
            await first.stop(grace_s=0.5)
            await server.stop(grace_s=None)
        assert "sql" in state.read_text()

        registry, server, address = await controller()
        second = engine(address)
        await second.start()
        try:
            await _until(lambda: len(registry.replicas()) == 1)
            await _until(
                lambda: "sql" in {a.name for a in registry.get(second.replica_id).lora_adapters}
            )
            assert await _engine_adapters(second) == {"sql"}
            async with insecure_channel(address) as channel:
                await controller_pb2_grpc.ControllerServiceStub(channel).UnloadLoRAAdapter(
                    engine_pb2.UnloadLoRAAdapterRequest(lora_name="sql"), timeout=30
                )
        finally:
            await second.stop(grace_s=0.5)
            await server.stop(grace_s=None)
        assert LoRAFleet(ReplicaRegistry(6.0, 30.0), state).runtime_adapters == []

    asyncio.run(main())


def test_an_unreadable_state_file_is_ignored(tmp_path, caplog):
    from controller.lora_fleet import LoRAFleet

    state = tmp_path / "lora_adapters.json"
    state.write_text("{not json")
    with caplog.at_level("WARNING"):
        fleet = LoRAFleet(ReplicaRegistry(6.0, 30.0), state)
    assert fleet.runtime_adapters == []
    assert "unreadable LoRA state file" in caplog.text
