"""Prefill/decode disaggregation end to end: the official ``openai`` client against a
gateway routing to one prefill and one decode engine (real engine services, in-process)
gets exactly what it gets from a gateway in front of one colocated engine: greedy and
seeded outputs, logprobs, structured output. Prompts under the threshold skip the prefill
engine; the decode engine is the one the request runs on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import openai
import pytest

from engine_service.server import EngineServer
from gateway.route_sources import StaticRoutes
from switchyard.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from tests.gateway.conftest import (
    MAX_MODEL_LEN,
    MODEL_NAME,
    BackgroundLoop,
    ServedApp,
    serve_gateway,
    start_engine,
)

MESSAGES = [
    {"role": "system", "content": "You are a careful assistant who answers in full sentences."},
    {"role": "user", "content": "Describe the harbour at dawn, the boats and the gulls 🌊"},
]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def pd_engines(
    background: BackgroundLoop, checkpoint: Path
) -> Iterator[tuple[EngineServer, EngineServer]]:
    prefill = start_engine(background, checkpoint, role="prefill", max_num_batched_tokens=16)
    decode = start_engine(background, checkpoint, role="decode")
    yield prefill, decode
    for server in (prefill, decode):
        background.run(server.stop(grace_s=1))


def client_for(gateway: ServedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def colocated(
    background: BackgroundLoop, checkpoint: Path, engine: EngineServer
) -> Iterator[openai.OpenAI]:
    served = serve_gateway(background, checkpoint, StaticRoutes([f"127.0.0.1:{engine.port}"]))
    yield client_for(served)
    served.close()


def pd_gateway(
    background: BackgroundLoop, checkpoint: Path, engines: tuple[EngineServer, ...], **settings
) -> ServedApp:
    addresses = [f"127.0.0.1:{server.port}" for server in engines]
    return serve_gateway(background, checkpoint, StaticRoutes(addresses), **settings)


@pytest.fixture(scope="module")
def disaggregated(
    background: BackgroundLoop, checkpoint: Path, pd_engines: tuple[EngineServer, EngineServer]
) -> Iterator[openai.OpenAI]:
    served = pd_gateway(background, checkpoint, pd_engines, pd_min_prompt_tokens=8)
    yield client_for(served)
    served.close()


def load(server: EngineServer) -> Any:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stats = engine_pb2_grpc.EngineServiceStub(channel).GetStats(
            engine_pb2.GetStatsRequest(), timeout=5
        )
    return stats.load


def handoffs(server: EngineServer) -> int:
    return load(server).kv_handoffs_total


def chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **kwargs)


def summary(completion: Any) -> Any:
    choice = completion.choices[0]
    logprobs = None
    if choice.logprobs is not None:
        logprobs = [
            (entry.token, round(entry.logprob, 4), [t.token for t in entry.top_logprobs])
            for entry in choice.logprobs.content
        ]
    return (
        choice.message.content,
        choice.finish_reason,
        completion.usage.completion_tokens,
        logprobs,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_tokens=16, temperature=0, extra_body={"ignore_eos": True}),
        dict(max_tokens=16, temperature=0.9, top_p=0.9, seed=1234),
        dict(max_tokens=8, temperature=0, logprobs=True, top_logprobs=3),
        dict(
            max_tokens=60,
            temperature=0.7,
            seed=5,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "trip", "schema": SCHEMA, "strict": True},
            },
        ),
    ],
    ids=["greedy", "seeded", "logprobs", "structured"],
)
def test_one_prefill_and_one_decode_engine_answer_like_one_colocated_engine(
    colocated: openai.OpenAI,
    disaggregated: openai.OpenAI,
    pd_engines: tuple[EngineServer, EngineServer],
    kwargs: dict[str, Any],
) -> None:
    prefill, decode = pd_engines
    before = handoffs(decode), handoffs(prefill)

    got = summary(chat(disaggregated, **kwargs))

    assert got == summary(chat(colocated, **kwargs))
    assert (handoffs(decode), handoffs(prefill)) == (before[0] + 1, before[1] + 1)
    if "response_format" in kwargs:
        jsonschema.validate(json.loads(got[0]), SCHEMA)


def test_streamed_output_is_the_same(
    colocated: openai.OpenAI, disaggregated: openai.OpenAI
) -> None:
    kwargs = dict(max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True})

    def text(client: openai.OpenAI) -> str:
        return "".join(
            c.choices[0].delta.content or "" for c in chat(client, **kwargs) if c.choices
        )

    assert text(disaggregated) == text(colocated)


def test_prompts_under_the_threshold_skip_the_prefill_engine(
    background: BackgroundLoop,
    checkpoint: Path,
    pd_engines: tuple[EngineServer, EngineServer],
    colocated: openai.OpenAI,
) -> None:
    prefill, decode = pd_engines
    served = pd_gateway(background, checkpoint, pd_engines, pd_min_prompt_tokens=10_000)
    try:
        before = handoffs(decode), handoffs(prefill)
        kwargs = dict(max_tokens=10, temperature=0, extra_body={"ignore_eos": True})

        got = summary(chat(client_for(served), **kwargs))

        assert got == summary(chat(colocated, **kwargs))
        assert (handoffs(decode), handoffs(prefill)) == before
    finally:
        served.close()


def test_requests_never_run_on_a_prefill_engine_while_a_decode_engine_is_ready(
    background: BackgroundLoop,
    checkpoint: Path,
    pd_engines: tuple[EngineServer, EngineServer],
) -> None:
    prefill, _ = pd_engines
    served = pd_gateway(background, checkpoint, pd_engines, pd_min_prompt_tokens=10_000)
    try:
        before = load(prefill).prompt_tokens_total
        for _ in range(4):
            chat(client_for(served), max_tokens=2, temperature=0)
        assert load(prefill).prompt_tokens_total == before
    finally:
        served.close()


class DyingDecodeEngine(engine_pb2_grpc.EngineServiceServicer):
    """A decode engine that dies mid-request: before its first token, or after one. It
    reports the emptiest KV pool (a negative usage), so the router picks it first."""

    def __init__(self, tokens_before_dying: int) -> None:
        self.tokens_before_dying = tokens_before_dying
        self.calls = 0

    async def GetStats(self, request, context):  # type: ignore[no-untyped-def]
        return engine_pb2.GetStatsResponse(
            replica_id="dying",
            model=MODEL_NAME,
            max_model_len=MAX_MODEL_LEN,
            role=common_pb2.REPLICA_ROLE_DECODE,
            load=common_pb2.ReplicaLoad(kv_usage=-1.0),
        )

    async def Generate(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        assert request.prefill_address  # it was meant to import the prompt
        if self.tokens_before_dying:
            yield engine_pb2.GenerateResponse(token_ids=[100] * self.tokens_before_dying)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "engine process died")


def start_double(background: BackgroundLoop, servicer: DyingDecodeEngine) -> tuple[Any, str]:
    async def start() -> tuple[Any, int]:
        server = grpc.aio.server()
        engine_pb2_grpc.add_EngineServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = background.run(start())
    return server, f"127.0.0.1:{port}"


def test_a_decode_engine_dying_before_any_token_has_the_request_run_elsewhere(
    background: BackgroundLoop,
    checkpoint: Path,
    pd_engines: tuple[EngineServer, EngineServer],
    colocated: openai.OpenAI,
) -> None:
    prefill, decode = pd_engines
    dying = DyingDecodeEngine(tokens_before_dying=0)
    server, address = start_double(background, dying)
    addresses = [f"127.0.0.1:{prefill.port}", address, f"127.0.0.1:{decode.port}"]
    served = serve_gateway(background, checkpoint, StaticRoutes(addresses), pd_min_prompt_tokens=8)
    try:
        before = handoffs(decode)
        kwargs = dict(max_tokens=10, temperature=0, extra_body={"ignore_eos": True})

        got = summary(chat(client_for(served), **kwargs))

        assert dying.calls == 1
        assert got == summary(chat(colocated, **kwargs))
        assert handoffs(decode) == before + 1  # re-run on the live pair, disaggregated
    finally:
        served.close()
        background.run(server.stop(None))


def test_a_decode_engine_dying_after_a_token_is_a_clear_error(
    background: BackgroundLoop, checkpoint: Path, pd_engines: tuple[EngineServer, EngineServer]
) -> None:
    prefill, decode = pd_engines
    dying = DyingDecodeEngine(tokens_before_dying=1)
    server, address = start_double(background, dying)
    addresses = [f"127.0.0.1:{prefill.port}", address, f"127.0.0.1:{decode.port}"]
    served = serve_gateway(background, checkpoint, StaticRoutes(addresses), pd_min_prompt_tokens=8)
    try:
        prompts_before = load(decode).prompt_tokens_total
        with pytest.raises(openai.APIStatusError) as failed:
            chat(client_for(served), max_tokens=10, temperature=0)
        assert failed.value.status_code == 503
        assert failed.value.body["code"] == "engine_unavailable"
        assert dying.calls == 1
        assert load(decode).prompt_tokens_total == prompts_before  # not re-run
    finally:
        served.close()
        background.run(server.stop(None))
