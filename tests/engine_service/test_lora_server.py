"""LoRA through the engine service's wire: adapters at start (``--lora-modules``) and at
runtime (``LoadLoRAAdapter`` / ``UnloadLoRAAdapter``), errors as gRPC status codes, and the
adapters in GetStats, heartbeats and ``vllm:lora_requests_info``."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import httpx
import pytest
import torch

from engine_service.server import EngineServer
from switchyard.demo import make_test_checkpoint
from switchyard.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from tests.engine_service.test_server import (
    FakeController,
    engine_settings,
    start_fake_controller,
    wait_until,
)
from tests.lora_support import greedy_reference, make_peft_adapter, merged_model
from tests.support import BackgroundLoop

PROMPT = [5, 17, 42, 99, 123, 7]
MAX_NEW = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(checkpoint, {name: adapter folder}, {None or name: reference model})."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("lora-server")
    checkpoint = make_test_checkpoint(
        root / "tiny-llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
    )
    base = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    folders = {
        "sql": make_peft_adapter(
            base, root / "sql", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
        ),
        "chat": make_peft_adapter(
            base,
            root / "chat",
            2,
            r=8,
            lora_alpha=8,
            target_modules=["o_proj", "gate_proj", "down_proj"],
        ),
        "huge": make_peft_adapter(base, root / "huge", 3, r=32, target_modules=["q_proj"]),
    }
    models = {None: base, **{n: merged_model(base, folders[n]) for n in ("sql", "chat")}}
    return checkpoint, folders, models


@pytest.fixture(scope="module")
def served(world) -> Iterator[tuple[EngineServer, FakeController]]:
    checkpoint, folders, _ = world
    loop = BackgroundLoop()
    controller_server, controller, port = loop.run(start_fake_controller())
    settings = engine_settings(
        checkpoint,
        f"127.0.0.1:{port}",
        enable_lora=True,
        lora_modules=[f"sql={folders['sql']}"],
        max_loras=2,
        max_lora_rank=8,
    )
    server = EngineServer(settings)
    loop.run(server.start())
    yield server, controller
    loop.run(server.stop(grace_s=1))
    loop.run(controller_server.stop(None))
    loop.close()


@pytest.fixture
def stub(served) -> Iterator[engine_pb2_grpc.EngineServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{served[0].port}") as channel:
        yield engine_pb2_grpc.EngineServiceStub(channel)


def _generate(stub, adapter: str = "") -> list[int]:
    request = engine_pb2.GenerateRequest(
        prompt_token_ids=PROMPT,
        adapter=adapter,
        sampling=common_pb2.SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True),
    )
    return [t for r in stub.Generate(request, timeout=60) for t in r.token_ids]


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_an_adapter_from_lora_modules_serves_its_merged_model(world, stub):
    _, _, models = world
    assert _generate(stub, "sql") == greedy_reference(models["sql"], PROMPT, MAX_NEW)
    assert _generate(stub) == greedy_reference(models[None], PROMPT, MAX_NEW)


def test_an_unknown_adapter_is_not_found(stub):
    code, details = _code(lambda: _generate(stub, "nope"))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details


def test_load_serve_and_unload_at_runtime(world, stub):
    _, folders, models = world
    reply = stub.LoadLoRAAdapter(
        engine_pb2.LoadLoRAAdapterRequest(lora_name="chat", lora_path=str(folders["chat"])),
        timeout=30,
    )
    assert reply.adapter.name == "chat" and len(reply.adapter.fingerprint) == 32
    assert _generate(stub, "chat") == greedy_reference(models["chat"], PROMPT, MAX_NEW)
    again = engine_pb2.LoadLoRAAdapterRequest(lora_name="chat", lora_path=str(folders["sql"]))
    assert _code(lambda: stub.LoadLoRAAdapter(again, timeout=30))[0] == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    stub.UnloadLoRAAdapter(engine_pb2.UnloadLoRAAdapterRequest(lora_name="chat"), timeout=30)
    assert _code(lambda: _generate(stub, "chat"))[0] == grpc.StatusCode.NOT_FOUND
    unload = engine_pb2.UnloadLoRAAdapterRequest(lora_name="chat")
    assert _code(lambda: stub.UnloadLoRAAdapter(unload, timeout=30))[0] == (
        grpc.StatusCode.NOT_FOUND
    )


@pytest.mark.parametrize(
    "path, reason", [("huge", "exceeds --max-lora-rank 8"), ("missing", "cannot find")]
)
def test_a_bad_adapter_is_invalid_argument_and_disturbs_nothing(world, stub, path, reason):
    checkpoint, folders, models = world
    source = str(folders.get(path, checkpoint.parent / path))
    request = engine_pb2.LoadLoRAAdapterRequest(lora_name="bad", lora_path=source)
    code, details = _code(lambda: stub.LoadLoRAAdapter(request, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and reason in details
    assert _generate(stub, "sql") == greedy_reference(models["sql"], PROMPT, MAX_NEW)


def test_stats_heartbeats_and_metrics_show_the_adapters(world, served, stub):
    server, controller = served
    _, folders, _ = world
    _generate(stub, "sql")
    stats = stub.GetStats(engine_pb2.GetStatsRequest(), timeout=5)
    assert stats.max_loras == 2
    sql = next(a for a in stats.lora_adapters if a.name == "sql")
    assert sql.path == str(folders["sql"]) and sql.requests_total >= 1 and sql.resident
    wait_until(
        lambda: any(
            any(a.name == "sql" for a in beat.lora_adapters) for beat in controller.heartbeats
        )
    )
    assert controller.registered[-1].max_loras == 2
    body = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    info = [line for line in body.splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert len(info) == 1 and 'max_lora="2"' in info[0]
    assert 'running_lora_adapters=""' in info[0] and 'waiting_lora_adapters=""' in info[0]
    assert "switchyard:lora_loads_total" in body


def test_adapter_calls_on_an_engine_without_lora_are_failed_precondition(world):
    """An engine started without --enable-lora refuses adapters and says why."""
    checkpoint, folders, _ = world
    loop = BackgroundLoop()
    server = EngineServer(engine_settings(checkpoint, ""))
    loop.run(server.start())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            load = engine_pb2.LoadLoRAAdapterRequest(lora_name="sql", lora_path=str(folders["sql"]))
            code, details = _code(lambda: stub.LoadLoRAAdapter(load, timeout=30))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "--enable-lora" in details
            assert _code(lambda: _generate(stub, "sql"))[0] == grpc.StatusCode.INVALID_ARGUMENT
            assert stub.GetStats(engine_pb2.GetStatsRequest(), timeout=5).max_loras == 0
    finally:
        loop.run(server.stop(grace_s=1))
        loop.close()
