"""A burst far over capacity, through the gateway to a real engine replica: every answer is
a complete 200 or a 429/503 with ``Retry-After`` in the client's format, refusals are
counted, and the stack serves at once afterwards.

The replica runs two sequences and keeps two waiting, so a burst of a few dozen requests is
far over what it holds. Each bound is tested on its own: the engine's queue (the gateway's
per-replica bound lifted), the gateway's per-replica bound (from the capacity the replica
reports), and the gateway's bound in total.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine_service.server import EngineServer
from gateway.route_sources import StaticRoutes
from switchyard.settings import EngineSettings
from tests.gateway.conftest import MAX_MODEL_LEN, MODEL_NAME, BackgroundLoop, serve_gateway

BURST = 32
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def small_engine(checkpoint: Path, background: BackgroundLoop) -> Iterator[EngineServer]:
    settings = EngineSettings(
        model=str(checkpoint),
        served_model_name=MODEL_NAME,
        device="cpu",
        dtype="float32",
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        controller_address="",
        num_kv_blocks=128,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=2,
        max_queued_requests=2,
        data_dir=checkpoint.parent,
    )
    server = EngineServer(settings)
    background.run(server.start())
    yield server
    background.run(server.stop(grace_s=1))


def completion_body() -> dict[str, Any]:
    return {
        "model": MODEL_NAME,
        "prompt": "Hello there",
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
    }


async def burst(base_url: str, path: str, body: dict[str, Any]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=BURST)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post(path, json=body) for _ in range(BURST)))


def assert_only_complete_200s_and_refusals(responses: list[httpx.Response]) -> list[str]:
    """The error codes of the refused requests."""
    codes = []
    for response in responses:
        if response.status_code == 200:
            assert response.json()["usage"]["completion_tokens"] == MAX_TOKENS
            continue
        assert response.status_code in (429, 503), response.text
        assert int(response.headers["retry-after"]) >= 1
        codes.append(response.json()["error"]["code"])
    assert any(r.status_code == 200 for r in responses)
    return codes


def served_gateway(
    background: BackgroundLoop, checkpoint: Path, engine: EngineServer, **settings: Any
):  # type: ignore[no-untyped-def]
    routes = StaticRoutes([f"127.0.0.1:{engine.port}"], poll_interval_s=0.2)
    return serve_gateway(background, checkpoint, routes, **settings)


def rejected(base_url: str, code: str) -> float:
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith(f'switchyard_gateway_rejected_requests_total{{code="{code}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_a_full_engine_queue_gives_429s_and_the_next_request_succeeds(
    background: BackgroundLoop, checkpoint: Path, small_engine: EngineServer
) -> None:
    gateway = served_gateway(background, checkpoint, small_engine, max_in_flight_per_replica=1000)
    try:
        responses = asyncio.run(burst(gateway.base_url, "/v1/completions", completion_body()))
        codes = assert_only_complete_200s_and_refusals(responses)
        assert codes and set(codes) == {"engine_overloaded"}
        assert rejected(gateway.base_url, "engine_overloaded") == len(codes)
        after = httpx.post(f"{gateway.base_url}/v1/completions", json=completion_body(), timeout=60)
        assert after.status_code == 200
    finally:
        gateway.close()


def test_the_gateway_keeps_off_a_full_replica_before_it_refuses(
    background: BackgroundLoop, checkpoint: Path, small_engine: EngineServer
) -> None:
    gateway = served_gateway(background, checkpoint, small_engine)
    try:
        responses = asyncio.run(burst(gateway.base_url, "/v1/completions", completion_body()))
        codes = assert_only_complete_200s_and_refusals(responses)
        # The replica reports 2 running + 2 waiting; the gateway sends no more than that.
        assert len(responses) - len(codes) >= 4
        assert codes and set(codes) == {"replicas_overloaded"}
        after = httpx.post(f"{gateway.base_url}/v1/completions", json=completion_body(), timeout=60)
        assert after.status_code == 200
    finally:
        gateway.close()


def test_the_gateways_total_bound_answers_anthropic_clients_in_their_format(
    background: BackgroundLoop, checkpoint: Path, small_engine: EngineServer
) -> None:
    gateway = served_gateway(background, checkpoint, small_engine, max_in_flight_requests=3)
    body = {
        "model": MODEL_NAME,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "Hello"}],
    }
    try:
        responses = asyncio.run(burst(gateway.base_url, "/v1/messages", body))
        refused = [r for r in responses if r.status_code != 200]
        assert refused and all(r.status_code == 429 for r in refused)
        for response in refused:
            assert int(response.headers["retry-after"]) >= 1
            payload = response.json()
            assert payload["type"] == "error"
            assert payload["error"]["type"] == "rate_limit_error"
        assert all(r.json()["type"] == "message" for r in responses if r.status_code == 200)
        assert rejected(gateway.base_url, "gateway_overloaded") == len(refused)
    finally:
        gateway.close()
