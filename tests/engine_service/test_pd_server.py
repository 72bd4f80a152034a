"""Prefill/decode disaggregation between engine services over gRPC: a decode engine that
imports its prompt's KV from a prefill engine answers what one colocated engine answers;
incompatible engines are refused with a clear error; a failed, timed-out or aborted transfer
leaves no block behind and, unless aborted, falls back to computing the prompt."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from engine_service.server import EngineServer
from switchyard.demo import make_test_checkpoint
from switchyard.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from tests.engine_service.test_server import engine_settings, wait_until
from tests.support import BackgroundLoop

TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=512,
)
PROMPT = [(13 * i + 5) % 250 + 3 for i in range(90)]  # six blocks of 16, over several steps


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_checkpoint(tmp_path_factory.mktemp("pd") / "tiny", **TINY)


@pytest.fixture(scope="module")
def background() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()


class Engines:
    """Engine servers started on the background loop, stopped together."""

    def __init__(self, background: BackgroundLoop, checkpoint: Path) -> None:
        self._background = background
        self._checkpoint = checkpoint
        self._servers: list[EngineServer] = []

    def start(self, checkpoint: Path | None = None, **overrides: Any) -> str:
        settings = engine_settings(checkpoint or self._checkpoint, "", **overrides)
        server = EngineServer(settings)
        self._background.run(server.start())
        self._servers.append(server)
        return f"127.0.0.1:{server.port}"

    def metrics(self, address: str) -> str:
        server = next(s for s in self._servers if address.endswith(f":{s.port}"))
        return httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text

    def stop(self) -> None:
        for server in self._servers:
            self._background.run(server.stop(grace_s=1))


@pytest.fixture(scope="module")
def engines(background: BackgroundLoop, checkpoint: Path) -> Iterator[Engines]:
    made = Engines(background, checkpoint)
    yield made
    made.stop()


@pytest.fixture(scope="module")
def colocated(engines: Engines) -> str:
    return engines.start()


@pytest.fixture(scope="module")
def prefill(engines: Engines) -> str:
    # 32-token steps: a 90-token prompt leaves in several chunks while the rest computes.
    return engines.start(role="prefill", max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def decode(engines: Engines) -> str:
    return engines.start(role="decode")


def stub(address: str) -> engine_pb2_grpc.EngineServiceStub:
    return engine_pb2_grpc.EngineServiceStub(grpc.insecure_channel(address))


def generate(address: str, prompt: list[int], prefill_address: str = "", **sampling: Any):
    request = engine_pb2.GenerateRequest(
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(**sampling),
        prefill_address=prefill_address,
    )
    responses = list(stub(address).Generate(request, timeout=60))
    tokens = [t for r in responses for t in r.token_ids]
    logprobs = [(lp.token_id, round(lp.logprob, 4)) for r in responses for lp in r.logprobs]
    return tokens, logprobs, responses[-1].finish_reason


def stats(address: str) -> engine_pb2.GetStatsResponse:
    return stub(address).GetStats(engine_pb2.GetStatsRequest(), timeout=5)


def all_free(address: str) -> bool:
    answer = stats(address)
    return answer.num_blocks_free == answer.num_blocks_total and not answer.load.num_running


def counter(metrics: str, name: str, **labels: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize(
    "sampling",
    [
        dict(max_tokens=12, temperature=0.0, ignore_eos=True),
        dict(max_tokens=12, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True),
        dict(max_tokens=8, temperature=0.0, logprobs=3, ignore_eos=True),
    ],
    ids=["greedy", "seeded", "logprobs"],
)
def test_decode_engine_fed_by_a_prefill_engine_answers_like_one_engine(
    colocated: str, prefill: str, decode: str, engines: Engines, sampling: dict
) -> None:
    want = generate(colocated, PROMPT, **sampling)
    before = stats(decode).load.kv_handoffs_total

    got = generate(decode, PROMPT, prefill_address=prefill, **sampling)

    assert got == want
    assert stats(decode).load.kv_handoffs_total == before + 1
    assert stats(prefill).role == common_pb2.REPLICA_ROLE_PREFILL
    assert stats(decode).role == common_pb2.REPLICA_ROLE_DECODE
    metrics = engines.metrics(decode)
    assert counter(metrics, "switchyard:kv_transfers_total", outcome="done") >= 1
    assert counter(metrics, "switchyard:kv_transfer_bytes_count") >= 1
    assert counter(engines.metrics(prefill), "switchyard:kv_handoffs_total", direction="sent") >= 1
    wait_until(lambda: all_free(decode) and all_free(prefill))


def test_a_prompt_the_decode_engine_partly_holds_sends_only_the_rest(
    colocated: str, prefill: str, decode: str
) -> None:
    shared = [(29 * i + 1) % 250 + 3 for i in range(64)]  # four full blocks
    generate(decode, [*shared, 7, 8, 9], prefill_address=prefill, max_tokens=2)
    prompt = shared + [(3 * i) % 250 + 3 for i in range(40)]  # 104 tokens: seven blocks
    sent_before = stats(prefill).load.kv_handoff_bytes_total
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # layers, K/V, block, kv heads, head dim, fp32

    got = generate(decode, prompt, prefill_address=prefill, max_tokens=6, temperature=0.0)

    assert got == generate(colocated, prompt, max_tokens=6, temperature=0.0)
    assert stats(prefill).load.kv_handoff_bytes_total - sent_before == 3 * block_bytes


def test_the_prefill_engine_refuses_another_block_size_and_the_decode_engine_recomputes(
    engines: Engines, colocated: str, prefill: str
) -> None:
    odd = engines.start(role="decode", block_size=32, num_kv_blocks=32)
    layout = stats(odd).kv_layout
    with pytest.raises(grpc.RpcError) as refused:
        list(
            stub(prefill).Prefill(
                engine_pb2.PrefillRequest(
                    request=engine_pb2.GenerateRequest(request_id="x", prompt_token_ids=PROMPT),
                    layout=layout,
                    decode_replica_id="odd",
                ),
                timeout=10,
            )
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "block size 32 against this engine's 16" in refused.value.details()

    sampling = dict(max_tokens=6, temperature=0.0)
    assert generate(odd, PROMPT, prefill_address=prefill, **sampling) == generate(
        colocated, PROMPT, **sampling
    )
    assert counter(engines.metrics(odd), "switchyard:kv_transfers_total", outcome="recomputed") == 1
    wait_until(lambda: all_free(odd) and all_free(prefill))


def test_the_prefill_engine_refuses_blocks_of_another_model(
    engines: Engines, prefill: str, tmp_path: Path
) -> None:
    other = make_test_checkpoint(tmp_path / "other", **TINY, seed=5)
    layout = stats(engines.start(other, role="decode")).kv_layout
    assert layout.block_shape == stats(prefill).kv_layout.block_shape
    with pytest.raises(grpc.RpcError) as refused:
        list(
            stub(prefill).Prefill(
                engine_pb2.PrefillRequest(
                    request=engine_pb2.GenerateRequest(prompt_token_ids=PROMPT), layout=layout
                ),
                timeout=10,
            )
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "another model" in refused.value.details()


class StallingPrefill(engine_pb2_grpc.EngineServiceServicer):
    """A prefill engine that sends ``chunks`` real-looking chunks, then either hangs or
    fails UNAVAILABLE (a prefill engine dying mid-transfer); records cancellations."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.cancelled = asyncio.Event()
        self.calls = 0

    async def Prefill(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        layout = request.layout
        block_bytes = 4
        for dim in layout.block_shape:
            block_bytes *= dim
        yield engine_pb2.PrefillResponse(
            first_block=request.num_skip_blocks, num_blocks=1, data=b"\0" * block_bytes
        )
        if self.fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prefill engine went away")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


def start_fake(background: BackgroundLoop, servicer: StallingPrefill) -> tuple[Any, str]:
    async def start() -> tuple[Any, int]:
        server = grpc.aio.server()
        engine_pb2_grpc.add_EngineServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = background.run(start())
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("failure", ["dies", "times out", "unreachable"])
def test_a_failed_transfer_makes_the_decode_engine_compute_the_prompt(
    engines: Engines, background: BackgroundLoop, colocated: str, failure: str
) -> None:
    decode = engines.start(role="decode", kv_transfer_timeout_s=1.0)
    fake = StallingPrefill(fail=failure == "dies")
    server, address = start_fake(background, fake)
    if failure == "unreachable":
        background.run(server.stop(None))
    sampling = dict(max_tokens=6, temperature=0.0)

    got = generate(decode, PROMPT, prefill_address=address, **sampling)

    assert got == generate(colocated, PROMPT, **sampling)
    assert counter(engines.metrics(decode), "switchyard:kv_transfers_total", outcome="recomputed")
    wait_until(lambda: all_free(decode))
    if failure == "times out":
        wait_until(fake.cancelled.is_set)
    background.run(server.stop(None))


def test_abort_during_transfer_frees_the_decode_engine_and_cancels_the_prefill(
    engines: Engines, background: BackgroundLoop, decode: str
) -> None:
    fake = StallingPrefill(fail=False)
    server, address = start_fake(background, fake)
    call = stub(decode).Generate(
        engine_pb2.GenerateRequest(
            prompt_token_ids=PROMPT,
            sampling=common_pb2.SamplingParams(max_tokens=4),
            prefill_address=address,
        ),
        timeout=60,
    )
    wait_until(lambda: fake.calls == 1)
    assert stats(decode).load.num_awaiting_kv == 1
    assert not all_free(decode)  # the prompt's blocks are reserved

    call.cancel()

    wait_until(fake.cancelled.is_set)
    wait_until(lambda: all_free(decode) and stats(decode).load.num_awaiting_kv == 0)
    background.run(server.stop(None))


def test_a_cancelled_prefill_frees_the_prefill_engine(prefill: str, decode: str) -> None:
    long_prompt = [(7 * i + 2) % 250 + 3 for i in range(240)]
    call = stub(prefill).Prefill(
        engine_pb2.PrefillRequest(
            request=engine_pb2.GenerateRequest(request_id="c", prompt_token_ids=long_prompt),
            layout=stats(decode).kv_layout,
        ),
        timeout=60,
    )
    first = next(call)
    assert first.num_blocks >= 1 and not first.HasField("result")

    call.cancel()

    wait_until(lambda: all_free(prefill))
