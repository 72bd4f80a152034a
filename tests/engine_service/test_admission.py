"""An engine replica's admission: a bounded waiting queue answered with RESOURCE_EXHAUSTED,
queue depth and capacity in its reported load, and grammars compiled off the step thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from engine_service.engine import EngineStats
from engine_service.server import EngineServer, default_max_queued_requests
from switchyard.demo import make_test_checkpoint
from switchyard.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from tests.engine_service.test_server import engine_settings, wait_until
from tests.support import BackgroundLoop

PROMPT = [5, 17, 42, 99, 123, 7, 300, 11]
MAX_QUEUED = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_checkpoint(
        tmp_path_factory.mktemp("admission") / "tiny-llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=1024,
    )


@pytest.fixture(scope="module")
def background() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def server(checkpoint: Path, background: BackgroundLoop) -> Iterator[EngineServer]:
    # One sequence at a time, so a second request waits as long as the first one runs.
    settings = engine_settings(
        checkpoint,
        "",
        max_num_seqs=1,
        max_queued_requests=MAX_QUEUED,
        max_model_len=1024,
        num_kv_blocks=128,
    )
    server = EngineServer(settings)
    background.run(server.start())
    yield server
    background.run(server.stop(grace_s=1))


@pytest.fixture
def stub(server: EngineServer) -> Iterator[engine_pb2_grpc.EngineServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield engine_pb2_grpc.EngineServiceStub(channel)


def request(max_tokens: int, **fields: object) -> engine_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return engine_pb2.GenerateRequest(prompt_token_ids=PROMPT, sampling=sampling, **fields)


def load(stub: engine_pb2_grpc.EngineServiceStub) -> common_pb2.ReplicaLoad:
    return stub.GetStats(engine_pb2.GetStatsRequest(), timeout=5).load


def test_load_reports_the_replicas_capacity(stub: engine_pb2_grpc.EngineServiceStub) -> None:
    reported = load(stub)
    assert reported.max_num_seqs == 1
    assert reported.max_queued_requests == MAX_QUEUED


def test_a_full_queue_is_refused_with_resource_exhausted_and_frees_up(
    stub: engine_pb2_grpc.EngineServiceStub,
) -> None:
    running = stub.Generate(request(1000), timeout=60)
    next(running)  # it runs now: the one sequence slot is taken
    waiting = [stub.Generate(request(4), timeout=60) for _ in range(MAX_QUEUED)]
    wait_until(lambda: load(stub).num_waiting == MAX_QUEUED)

    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Generate(request(4), timeout=60))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in (refused.value.details() or "")
    assert running.running(), "the long request must still hold the slot for this to test"

    running.cancel()
    for call in waiting:
        assert sum(len(r.token_ids) for r in call) == 4, "accepted requests complete in full"
    wait_until(lambda: load(stub).num_waiting == 0)
    assert sum(len(r.token_ids) for r in stub.Generate(request(4), timeout=60)) == 4


def test_grammars_compile_off_the_step_thread(
    server: EngineServer, stub: engine_pb2_grpc.EngineServiceStub
) -> None:
    """Spies on the engine's grammar compiler (the real one still runs) to see which
    thread calls it."""
    engine = server._engine
    assert engine is not None
    structured = engine.structured
    compile_matcher = structured.matcher
    threads: list[str] = []

    def spy(spec):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return compile_matcher(spec)

    structured.matcher = spy  # type: ignore[method-assign]
    try:
        constrained = request(32, structured=common_pb2.StructuredOutput(regex="[ab]{3}"))
        responses = list(stub.Generate(constrained, timeout=60))
    finally:
        del structured.matcher
    assert responses[-1].finished
    assert threads and all(not name.startswith("engine-loop") for name in threads)


def stats_with_blocks(num_blocks: int) -> EngineStats:
    return EngineStats(0, 0, 0.0, num_blocks, num_blocks, 0, 0, 0, 0, 0, 0)


def test_the_default_queue_bound_fits_the_kv_pool() -> None:
    # 512 blocks of 16 tokens hold 32 requests of 256 tokens.
    assert default_max_queued_requests(4, 16, stats_with_blocks(512)) == 32
    # Never fewer than one running batch's worth.
    assert default_max_queued_requests(256, 16, stats_with_blocks(512)) == 256
    assert default_max_queued_requests(1, 16, stats_with_blocks(1)) == 1
