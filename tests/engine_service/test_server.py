"""The engine service over the wire: a real server on a small random checkpoint, driven
through the generated stubs, with a fake controller to register with."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine_service.server import EngineServer
from switchyard.demo import make_test_checkpoint
from switchyard.settings import EngineSettings
from switchyard.v1 import (
    common_pb2,
    controller_pb2,
    controller_pb2_grpc,
    engine_pb2,
    engine_pb2_grpc,
)
from tests.support import BackgroundLoop

T = TypeVar("T")
MODEL_NAME = "test-model"
MAX_MODEL_LEN = 256
SERVING = health_pb2.HealthCheckResponse.SERVING


class FakeController(controller_pb2_grpc.ControllerServiceServicer):
    """Test double of the controller: records what engines tell it; ``forget_next_beat``
    answers one heartbeat known=false."""

    def __init__(self) -> None:
        self.registered: list[common_pb2.Replica] = []
        self.heartbeats: list[controller_pb2.HeartbeatRequest] = []
        self.deregistered: list[str] = []
        self.engine_health_at_deregister: list[int] = []
        self.forget_next_beat = False

    async def Register(self, request, context):  # type: ignore[no-untyped-def]
        self.registered.append(request.replica)
        return controller_pb2.RegisterResponse(heartbeat_interval_s=0.1)

    async def Heartbeat(self, request, context):  # type: ignore[no-untyped-def]
        self.heartbeats.append(request)
        if self.forget_next_beat:
            self.forget_next_beat = False
            return controller_pb2.HeartbeatResponse(known=False)
        return controller_pb2.HeartbeatResponse(known=True)

    async def Deregister(self, request, context):  # type: ignore[no-untyped-def]
        address = self.registered[-1].address
        async with grpc.aio.insecure_channel(address) as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
        self.engine_health_at_deregister.append(answer.status)
        self.deregistered.append(request.replica_id)
        return controller_pb2.DeregisterResponse()


async def start_fake_controller(port: int = 0) -> tuple[grpc.aio.Server, FakeController, int]:
    controller = FakeController()
    server = grpc.aio.server()
    controller_pb2_grpc.add_ControllerServiceServicer_to_server(controller, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, controller, bound


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def engine_settings(checkpoint: Path, controller_address: str, **overrides: Any) -> EngineSettings:
    values: dict[str, Any] = dict(
        model=str(checkpoint),
        served_model_name=MODEL_NAME,
        device="cpu",
        dtype="float32",
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        controller_address=controller_address,
        heartbeat_interval_s=0.1,
        block_size=16,
        num_kv_blocks=64,
        max_model_len=MAX_MODEL_LEN,
        data_dir=checkpoint.parent,
    )
    values.update(overrides)
    return EngineSettings(**values)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny-llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
    )


@pytest.fixture(scope="module")
def background() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def controller(background: BackgroundLoop) -> Iterator[tuple[FakeController, int]]:
    server, fake, port = background.run(start_fake_controller())
    yield fake, port
    background.run(server.stop(None))


@pytest.fixture(scope="module")
def engine(
    checkpoint: Path, background: BackgroundLoop, controller: tuple[FakeController, int]
) -> Iterator[EngineServer]:
    server = EngineServer(engine_settings(checkpoint, f"127.0.0.1:{controller[1]}"))
    background.run(server.start())
    yield server
    background.run(server.stop(grace_s=1))


@pytest.fixture(scope="module")
def channel(engine: EngineServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.Channel) -> engine_pb2_grpc.EngineServiceStub:
    return engine_pb2_grpc.EngineServiceStub(channel)


def generate(
    stub: engine_pb2_grpc.EngineServiceStub, prompt: list[int], **sampling: Any
) -> list[engine_pb2.GenerateResponse]:
    request = engine_pb2.GenerateRequest(
        prompt_token_ids=prompt, sampling=common_pb2.SamplingParams(**sampling)
    )
    return list(stub.Generate(request, timeout=60))


def tokens_of(responses: list[engine_pb2.GenerateResponse], index: int = 0) -> list[int]:
    return [t for r in responses if r.index == index for t in r.token_ids]


def all_blocks_free(stub: engine_pb2_grpc.EngineServiceStub) -> bool:
    stats = stub.GetStats(engine_pb2.GetStatsRequest(), timeout=5)
    return stats.num_blocks_free == stats.num_blocks_total and stats.load.num_running == 0


PROMPT = [5, 17, 42, 99, 123, 7, 300, 11]


def test_health_service_reports_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "switchyard.v1.EngineService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert answer.status == SERVING


def test_greedy_generation_matches_transformers(
    stub: engine_pb2_grpc.EngineServiceStub, checkpoint: Path
) -> None:
    from transformers import LlamaForCausalLM

    responses = generate(stub, PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True)

    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT])
    expected: list[int] = []
    with torch.no_grad():
        for _ in range(8):
            next_id = int(model(ids).logits[0, -1].argmax())
            expected.append(next_id)
            ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    assert tokens_of(responses) == expected


def test_stream_delivers_deltas_and_a_length_finish(
    stub: engine_pb2_grpc.EngineServiceStub,
) -> None:
    responses = generate(stub, PROMPT, max_tokens=6, temperature=0.0, ignore_eos=True)

    assert len(responses) >= 2, "tokens arrive as a stream of deltas, not one message"
    assert len(tokens_of(responses)) == 6
    assert all(not r.finished for r in responses[:-1])
    last = responses[-1]
    assert last.finished and last.finish_reason == "length"
    assert last.num_prompt_tokens == len(PROMPT)


def test_n_samples_stream_separately(stub: engine_pb2_grpc.EngineServiceStub) -> None:
    responses = generate(stub, PROMPT, n=2, max_tokens=5, temperature=1.0, seed=7, ignore_eos=True)

    assert {r.index for r in responses} == {0, 1}
    for index in (0, 1):
        assert len(tokens_of(responses, index)) == 5
        finishes = [r for r in responses if r.index == index and r.finished]
        assert [f.finish_reason for f in finishes] == ["length"]


def test_logprobs_come_with_every_token(stub: engine_pb2_grpc.EngineServiceStub) -> None:
    responses = generate(stub, PROMPT, max_tokens=4, temperature=0.0, logprobs=3, ignore_eos=True)

    for response in responses:
        assert len(response.logprobs) == len(response.token_ids)
        for token_id, logprob in zip(response.token_ids, response.logprobs):
            assert logprob.token_id == token_id
            assert logprob.logprob <= 0.0
            assert len(logprob.top) == 3
            # Greedy: the sampled token is the most likely one.
            assert logprob.top[0].token_id == token_id
            assert logprob.top[0].logprob == pytest.approx(logprob.logprob, abs=1e-4)
            assert [t.logprob for t in logprob.top] == sorted(
                (t.logprob for t in logprob.top), reverse=True
            )


def test_stop_token_ends_the_sample_with_stop(stub: engine_pb2_grpc.EngineServiceStub) -> None:
    first = tokens_of(generate(stub, PROMPT, max_tokens=3, temperature=0.0, ignore_eos=True))
    responses = generate(stub, PROMPT, max_tokens=10, temperature=0.0, stop_token_ids=[first[1]])

    last = responses[-1]
    assert last.finished and last.finish_reason == "stop"
    assert last.stop_token_id == first[1]
    assert tokens_of(responses)[-1] == first[1]


def test_cancelling_the_stream_aborts_and_frees_blocks(
    stub: engine_pb2_grpc.EngineServiceStub,
) -> None:
    request = engine_pb2.GenerateRequest(
        request_id="to-cancel",
        prompt_token_ids=PROMPT * 4,
        sampling=common_pb2.SamplingParams(max_tokens=200, ignore_eos=True),
    )
    call = stub.Generate(request, timeout=60)
    first = next(call)
    assert first.token_ids
    stats = stub.GetStats(engine_pb2.GetStatsRequest(), timeout=5)
    assert stats.num_blocks_free < stats.num_blocks_total

    call.cancel()

    wait_until(lambda: all_blocks_free(stub))
    # The id is free again: the server forgot the cancelled request.
    assert generate(stub, PROMPT, max_tokens=2, ignore_eos=True)[-1].finished


def test_abort_rpc_ends_the_stream_with_abort(stub: engine_pb2_grpc.EngineServiceStub) -> None:
    request = engine_pb2.GenerateRequest(
        request_id="to-abort",
        prompt_token_ids=PROMPT,
        sampling=common_pb2.SamplingParams(n=2, max_tokens=200, ignore_eos=True),
    )
    call = stub.Generate(request, timeout=60)
    next(call)

    assert stub.Abort(engine_pb2.AbortRequest(request_id="to-abort"), timeout=5).found
    rest = list(call)

    finishes = {r.index: r.finish_reason for r in rest if r.finished}
    assert set(finishes.values()) == {"abort"}
    assert len(finishes) >= 1
    wait_until(lambda: all_blocks_free(stub))
    assert not stub.Abort(engine_pb2.AbortRequest(request_id="to-abort"), timeout=5).found


@pytest.mark.parametrize(
    ("prompt", "sampling", "message"),
    [
        ([1] * MAX_MODEL_LEN, {}, "context"),
        ([], {}, "empty"),
        (PROMPT, {"temperature": -1.0}, "temperature"),
        ([10**6], {}, "token ids"),
    ],
    ids=["too-long", "empty", "bad-temperature", "out-of-vocab"],
)
def test_bad_input_is_invalid_argument_and_server_keeps_serving(
    stub: engine_pb2_grpc.EngineServiceStub,
    prompt: list[int],
    sampling: dict[str, Any],
    message: str,
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        generate(stub, prompt, **sampling)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()
    assert generate(stub, PROMPT, max_tokens=2, ignore_eos=True)[-1].finished


def test_duplicate_running_request_id_is_rejected(
    stub: engine_pb2_grpc.EngineServiceStub,
) -> None:
    request = engine_pb2.GenerateRequest(
        request_id="twice",
        prompt_token_ids=PROMPT,
        sampling=common_pb2.SamplingParams(max_tokens=200, ignore_eos=True),
    )
    call = stub.Generate(request, timeout=60)
    next(call)
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(request, timeout=10))
    call.cancel()
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_get_stats_describes_the_replica(
    stub: engine_pb2_grpc.EngineServiceStub, engine: EngineServer
) -> None:
    generate(stub, PROMPT, max_tokens=3, ignore_eos=True)
    stats = stub.GetStats(engine_pb2.GetStatsRequest(), timeout=5)

    assert stats.replica_id == engine.replica_id
    assert stats.model == MODEL_NAME
    assert stats.max_model_len == MAX_MODEL_LEN
    assert stats.block_size == 16
    assert stats.num_blocks_total == 64
    assert stats.load.prompt_tokens_total >= len(PROMPT)
    assert stats.load.generation_tokens_total >= 3


def test_metrics_endpoint_exports_vllm_names(
    stub: engine_pb2_grpc.EngineServiceStub, engine: EngineServer
) -> None:
    long_prompt = PROMPT * 5  # two full blocks: the second request hits the prefix cache
    generate(stub, long_prompt, max_tokens=4, ignore_eos=True)
    generate(stub, long_prompt, max_tokens=4, ignore_eos=True)
    text = httpx.get(f"http://127.0.0.1:{engine.metrics_port}/metrics", timeout=5).text

    def value(name: str) -> float:
        match = re.search(rf'^{re.escape(name)}\{{model_name="{MODEL_NAME}"\}} (\S+)$', text, re.M)
        assert match, f"{name} missing from /metrics"
        return float(match.group(1))

    assert value("vllm:num_requests_running") == 0
    assert value("vllm:num_requests_waiting") == 0
    assert 0.0 <= value("vllm:kv_cache_usage_perc") <= 1.0
    assert value("vllm:prompt_tokens_total") >= 2 * len(long_prompt)
    assert value("vllm:generation_tokens_total") >= 8
    assert value("vllm:prefix_cache_queries_total") >= value("vllm:prefix_cache_hits_total") > 0
    assert value("vllm:num_preemptions_total") >= 0
    assert value("vllm:time_to_first_token_seconds_count") >= 2
    assert value("vllm:inter_token_latency_seconds_count") >= 6
    assert value("vllm:time_per_output_token_seconds_count") >= 6
    assert value("vllm:e2e_request_latency_seconds_count") >= 2
    assert "# TYPE vllm:prompt_tokens_total counter" in text
    assert "# TYPE vllm:time_to_first_token_seconds histogram" in text


def test_engine_registers_and_heartbeats_its_load(
    engine: EngineServer, controller: tuple[FakeController, int]
) -> None:
    fake, _ = controller
    wait_until(lambda: len(fake.heartbeats) >= 2)

    replica = fake.registered[0]
    assert replica.replica_id == engine.replica_id
    assert replica.address == f"127.0.0.1:{engine.port}"
    assert replica.metrics_address == f"127.0.0.1:{engine.metrics_port}"
    assert replica.model == MODEL_NAME
    assert replica.max_model_len == MAX_MODEL_LEN
    assert replica.state == common_pb2.REPLICA_STATE_READY
    assert all(beat.replica_id == engine.replica_id for beat in fake.heartbeats)


def test_engine_registers_again_when_the_controller_forgets_it(
    engine: EngineServer, controller: tuple[FakeController, int]
) -> None:
    fake, _ = controller
    wait_until(lambda: len(fake.registered) >= 1)
    registrations = len(fake.registered)

    fake.forget_next_beat = True

    wait_until(lambda: len(fake.registered) == registrations + 1)


def test_engine_serves_without_controller_then_registers_and_deregisters_on_stop(
    checkpoint: Path, background: BackgroundLoop
) -> None:
    controller_port = free_port()
    server = EngineServer(
        engine_settings(checkpoint, f"127.0.0.1:{controller_port}", replica_id="late")
    )
    background.run(server.start())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            assert generate(stub, PROMPT, max_tokens=2, ignore_eos=True)[-1].finished

        controller_server, fake, _ = background.run(start_fake_controller(controller_port))
        wait_until(lambda: len(fake.registered) >= 1 and len(fake.heartbeats) >= 1)
        assert fake.registered[0].replica_id == "late"
    finally:
        background.run(server.stop(grace_s=1))
    try:
        assert fake.deregistered == ["late"]
        # Health flipped to NOT_SERVING before the engine left the routing table.
        assert fake.engine_health_at_deregister == [health_pb2.HealthCheckResponse.NOT_SERVING]
    finally:
        background.run(controller_server.stop(None))


def test_module_entry_point_serves_and_stops_on_sigterm(checkpoint: Path) -> None:
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine_service",
            "--model",
            str(checkpoint),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--controller-address",
            "",
            "--num-kv-blocks",
            "32",
            "--max-model-len",
            "128",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                try:
                    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                except grpc.RpcError:
                    return False
                return answer.status == SERVING

            wait_until(serving, timeout=120)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert '"msg": "engine stopped"' in stderr
    assert '"service": "engine"' in stderr


def test_a_failing_step_ends_its_requests_frees_their_blocks_and_keeps_serving(
    engine: EngineServer, stub: engine_pb2_grpc.EngineServiceStub
) -> None:
    runner = engine._engine.runner
    real_execute = runner.execute
    failures = {"left": 1}

    def execute_failing_once(batch, *args):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("device fault")
        return real_execute(batch, *args)

    runner.execute = execute_failing_once
    try:
        with pytest.raises(grpc.RpcError) as err:
            generate(stub, PROMPT, max_tokens=5, ignore_eos=True)
        assert "device fault" in (err.value.details() or "")
        wait_until(lambda: all_blocks_free(stub))
        assert len(tokens_of(generate(stub, PROMPT, max_tokens=3, ignore_eos=True))) == 3
    finally:
        runner.execute = real_execute
