"""Prefix-cache-aware routing: the index of KV events, the policy, and the whole path."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine_service.engine.kv_cache import KVCacheManager
from engine_service.engine.kv_events import KVEventLog
from engine_service.engine.request import Request
from engine_service.engine.sampling_params import SamplingParams
from engine_service.server import EngineServer
from gateway.prefix_index import KVEventFollower, PrefixIndex
from gateway.prefix_policy import PrefixAwarePolicy
from gateway.route_sources import StaticRoutes
from gateway.routing import Replica, RequestInfo, RoundRobinPolicy
from switchyard.block_hash import block_extra_keys, chained_block_hashes
from switchyard.grpc_utils import insecure_channel
from switchyard.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from tests.gateway.conftest import (
    MODEL_NAME,
    BackgroundLoop,
    serve_gateway,
    start_engine,
)

BLOCK = 4
DEVICE = 1
PROMPT = list(range(10, 30))  # five full blocks


def replica(name: str, running: int = 0) -> Replica:
    return Replica(replica_id=name, address=f"{name}:1", num_running=running)


def info(prompt: list[int], session_id: str = "", **keys: str) -> RequestInfo:
    return RequestInfo(
        request_id="r", model="m", prompt_token_ids=prompt, session_id=session_id, **keys
    )


def index_holding(holdings: dict[str, int]) -> PrefixIndex:
    """An index where replica ``name`` holds the first ``n`` blocks of ``PROMPT``."""
    index = PrefixIndex()
    hashes = chained_block_hashes(PROMPT, BLOCK)
    for name, num_blocks in holdings.items():
        index.reset(name, BLOCK)
        index.apply(name, True, DEVICE, hashes[:num_blocks])
    return index


def test_the_replica_with_the_longest_cached_prefix_wins():
    policy = PrefixAwarePolicy(index_holding({"a": 2, "b": 4, "c": 0}))
    chosen = policy.select([replica("a"), replica("b", running=2), replica("c")], info(PROMPT))
    assert chosen.replica_id == "b"


def test_a_prefix_stops_at_the_first_block_a_replica_lacks():
    index = index_holding({"a": 0})
    hashes = chained_block_hashes(PROMPT, BLOCK)
    index.apply("a", True, DEVICE, [hashes[0], hashes[2], hashes[3]])
    assert index.matched_blocks(["a"], PROMPT) == {"a": 1}
    index.apply("a", False, DEVICE, [hashes[0]])
    assert index.matched_blocks(["a"], PROMPT) == {"a": 0}


def test_the_load_guard_sends_work_away_from_a_piled_on_warm_replica():
    policy = PrefixAwarePolicy(index_holding({"a": 5, "b": 0}), load_guard=3)
    assert policy.select([replica("a", running=3), replica("b")], info(PROMPT)).replica_id == "a"
    assert policy.select([replica("a", running=4), replica("b")], info(PROMPT)).replica_id == "b"


def test_without_any_cached_prefix_the_least_loaded_replica_wins():
    policy = PrefixAwarePolicy(PrefixIndex())
    chosen = policy.select([replica("a", running=2), replica("b", running=1)], info(PROMPT))
    assert chosen.replica_id == "b"


def test_new_prefixes_spread_over_equally_loaded_replicas():
    # "a" sorts first and holds one prefix already; a prompt no replica holds goes to "b",
    # the equally loaded replica holding fewer blocks, not to the first by name.
    index = PrefixIndex()
    for name in ("a", "b"):
        index.reset(name, BLOCK)
    index.apply("a", True, DEVICE, chained_block_hashes(list(range(100, 120)), BLOCK))
    policy = PrefixAwarePolicy(index)
    assert policy.select([replica("a"), replica("b")], info(PROMPT)).replica_id == "b"
    # Load still comes first.
    assert policy.select([replica("a"), replica("b", running=1)], info([5] * 20)).replica_id == "a"


def test_a_burst_follows_the_first_request_before_events_confirm_it():
    policy = PrefixAwarePolicy(index_holding({"a": 0, "b": 0}), load_guard=8)
    first = policy.select([replica("a"), replica("b")], info(PROMPT))
    # The first request now loads its replica, yet the noted prefix still wins.
    busy = [replica(n, running=int(n == first.replica_id)) for n in ("a", "b")]
    assert policy.select(busy, info(PROMPT)).replica_id == first.replica_id


def test_a_session_sticks_to_one_replica_and_moves_only_with_its_replica():
    policy = PrefixAwarePolicy(PrefixIndex(), load_guard=100)
    replicas = [replica(n) for n in ("a", "b", "c", "d")]
    sessions = [f"session-{i}" for i in range(40)]
    placed = {s: policy.select(replicas, info(PROMPT, s)).replica_id for s in sessions}
    assert len(set(placed.values())) >= 3  # spread over the replicas
    assert all(policy.select(replicas, info([1], s)).replica_id == placed[s] for s in sessions)
    without_d = [r for r in replicas if r.replica_id != "d"]
    moved = {
        s for s in sessions if policy.select(without_d, info(PROMPT, s)).replica_id != placed[s]
    }
    assert moved == {s for s in sessions if placed[s] == "d"}


# -- the gateway hashes a request's blocks as the engine does -----------------------------------


def engine_cached_hashes(prompt: list[int], **request_fields: str) -> list[bytes]:
    """The block hashes the engine's KV manager announces (KV events) after caching
    ``prompt`` for a request with ``request_fields`` (adapter_id, cache_salt)."""
    events = KVEventLog()
    kv = KVCacheManager(
        num_blocks=16, block_size=BLOCK, enable_prefix_caching=True, listeners=[events]
    )
    request = Request("r", list(prompt), SamplingParams(), frozenset({0}), **request_fields)
    assert kv.allocate_slots(request, request.num_tokens, kv.get_computed_blocks(request))
    request.num_computed_tokens = request.num_tokens
    kv.commit_computed_blocks(request)
    return [h for event in events.drain() if event.stored for h in event.block_hashes]


@pytest.mark.parametrize(
    ("adapter", "cache_salt"),
    [("", ""), ("", "tenant-1"), ("sql-lora", ""), ("sql-lora", "tenant-1")],
    ids=["plain", "salt", "adapter", "adapter+salt"],
)
def test_the_index_hashes_a_request_as_the_engine_does(adapter, cache_salt):
    engine_hashes = engine_cached_hashes(
        PROMPT, adapter_id=adapter or None, cache_salt=cache_salt or None
    )
    keys = block_extra_keys(adapter, cache_salt)
    assert engine_hashes == chained_block_hashes(PROMPT, BLOCK, keys)
    index = PrefixIndex()
    index.reset("a", BLOCK)
    index.apply("a", True, DEVICE, engine_hashes)
    assert index.matched_blocks(["a"], PROMPT, keys) == {"a": len(PROMPT) // BLOCK}


@pytest.mark.parametrize(
    ("cached_with", "asked_with"),
    [
        ({"cache_salt": "tenant-1"}, {"cache_salt": "tenant-2"}),
        ({"cache_salt": "tenant-1"}, {}),
        ({}, {"cache_salt": "tenant-1"}),
        ({"adapter": "sql-lora"}, {"adapter": "chat-lora"}),
        ({"adapter": "x"}, {"cache_salt": "x"}),
    ],
)
def test_requests_differing_only_in_salt_or_adapter_share_no_block(cached_with, asked_with):
    engine_fields = {
        "adapter_id": cached_with.get("adapter"),
        "cache_salt": cached_with.get("cache_salt"),
    }
    engine_hashes = engine_cached_hashes(PROMPT, **engine_fields)
    asked = block_extra_keys(**asked_with)
    assert not set(engine_hashes) & set(chained_block_hashes(PROMPT, BLOCK, asked))
    index = PrefixIndex()
    index.reset("a", BLOCK)
    index.apply("a", True, DEVICE, engine_hashes)
    assert index.matched_blocks(["a"], PROMPT, asked) == {"a": 0}


def test_a_salted_request_goes_to_the_replica_holding_its_salted_prefix():
    index = PrefixIndex()
    for name in ("a", "b"):
        index.reset(name, BLOCK)
    index.apply("a", True, DEVICE, chained_block_hashes(PROMPT, BLOCK))
    index.apply("b", True, DEVICE, engine_cached_hashes(PROMPT, cache_salt="tenant-1"))
    policy = PrefixAwarePolicy(index)
    replicas = [replica("a"), replica("b")]
    assert policy.select(replicas, info(PROMPT, cache_salt="tenant-1")).replica_id == "b"
    assert policy.select(replicas, info(PROMPT)).replica_id == "a"


def test_round_robin_takes_each_replica_in_turn():
    policy = RoundRobinPolicy()
    replicas = [replica("b"), replica("a")]
    assert [policy.select(replicas, info(PROMPT)).replica_id for _ in range(4)] == list("abab")


# -- the whole path: engines' KV events, the gateway's index, and the HTTP API ----------------


@pytest.fixture(scope="module")
def engines(checkpoint: Path, background: BackgroundLoop) -> Iterator[list[EngineServer]]:
    servers = [start_engine(background, checkpoint) for _ in range(2)]
    yield servers
    for server in servers:
        background.run(server.stop(grace_s=1))


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_index_follows_an_engines_kv_events(engines, background):
    engine = engines[0]
    address = f"127.0.0.1:{engine.port}"
    index = PrefixIndex()
    follower = KVEventFollower(index, lambda: [Replica(replica_id="e0", address=address)])
    background.run(follower.start())
    try:
        prompt = list(range(5, 60))
        hashes = chained_block_hashes(prompt, 16)
        wait_until(lambda: "e0" in index.replica_ids())
        assert index.matched_blocks(["e0"], prompt) == {"e0": 0}

        async def generate() -> None:
            async with insecure_channel(address) as channel:
                stub = engine_pb2_grpc.EngineServiceStub(channel)
                request = engine_pb2.GenerateRequest(
                    request_id="kv-events",
                    prompt_token_ids=prompt,
                    sampling=common_pb2.SamplingParams(max_tokens=2),
                )
                async for _ in stub.Generate(request):
                    pass

        background.run(generate())
        wait_until(lambda: index.matched_blocks(["e0"], prompt)["e0"] == len(hashes))
    finally:
        background.run(follower.close())


def test_a_salted_requests_blocks_reach_the_index_under_its_salt(engines, background):
    address = f"127.0.0.1:{engines[1].port}"
    index = PrefixIndex()
    follower = KVEventFollower(index, lambda: [Replica(replica_id="e1", address=address)])
    background.run(follower.start())
    try:
        prompt = list(range(7, 60))
        salted = block_extra_keys(cache_salt="tenant-7")
        num_blocks = len(prompt) // 16
        wait_until(lambda: "e1" in index.replica_ids())

        async def generate() -> None:
            async with insecure_channel(address) as channel:
                stub = engine_pb2_grpc.EngineServiceStub(channel)
                request = engine_pb2.GenerateRequest(
                    request_id="salted-kv-events",
                    prompt_token_ids=prompt,
                    sampling=common_pb2.SamplingParams(max_tokens=2),
                    cache_salt="tenant-7",
                )
                async for _ in stub.Generate(request):
                    pass

        background.run(generate())
        wait_until(lambda: index.matched_blocks(["e1"], prompt, salted)["e1"] == num_blocks)
        assert index.matched_blocks(["e1"], prompt) == {"e1": 0}
        other = block_extra_keys(cache_salt="tenant-8")
        assert index.matched_blocks(["e1"], prompt, other) == {"e1": 0}
    finally:
        background.run(follower.close())


def test_the_cache_salt_of_an_http_request_isolates_its_prefix_in_the_engine(
    engines, background, checkpoint
):
    # One replica, so that every request meets the blocks of the ones before it.
    engine = engines[0]
    routes = StaticRoutes([f"127.0.0.1:{engine.port}"], poll_interval_s=0.2)
    gateway = serve_gateway(background, checkpoint, routes, routing_policy="prefix")
    prompt = "Signals and points on the branch line, listed in order from the junction. " * 4

    def hits_after(cache_salt: str) -> int:
        before = engine._current_stats().prefix_cache_hits
        response = httpx.post(
            f"{gateway.base_url}/v1/completions",
            json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1, "cache_salt": cache_salt},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        time.sleep(0.2)  # the engine publishes its stats after the step
        return engine._current_stats().prefix_cache_hits - before

    try:
        hits_after("tenant-a")
        assert hits_after("tenant-b") == 0
        assert hits_after("tenant-a") > 0
        response = httpx.post(
            f"{gateway.base_url}/v1/completions",
            json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1, "cache_salt": ""},
            timeout=60,
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "cache_salt"
    finally:
        gateway.close()


def test_the_gateway_sends_shared_prefix_requests_to_the_replica_holding_it(
    engines, background, checkpoint
):
    routes = StaticRoutes([f"127.0.0.1:{e.port}" for e in engines], poll_interval_s=0.2)
    gateway = serve_gateway(background, checkpoint, routes, routing_policy="prefix")
    system = "You are a terse assistant who answers about trains and signals. " * 6
    try:
        before = [e._current_stats() for e in engines]
        for turn in range(4):
            response = httpx.post(
                f"{gateway.base_url}/v1/completions",
                json={"model": MODEL_NAME, "prompt": f"{system} Question {turn}?", "max_tokens": 2},
                timeout=60,
            )
            assert response.status_code == 200, response.text
            time.sleep(0.2)  # the replica's KV events reach the gateway
        after = [e._current_stats() for e in engines]
        served = [a.prompt_tokens_total - b.prompt_tokens_total for a, b in zip(after, before)]
        assert sorted(served)[0] == 0, served  # one replica took every request
        warm = served.index(max(served))
        assert after[warm].prefix_cache_hits - before[warm].prefix_cache_hits > 0
    finally:
        gateway.close()


def test_the_follower_closes_the_channel_of_a_replica_that_left(background):
    def dead_address() -> str:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return f"127.0.0.1:{probe.getsockname()[1]}"

    first, second = dead_address(), dead_address()
    table = [Replica(replica_id="e0", address=first)]
    follower = KVEventFollower(PrefixIndex(), lambda: table, sync_interval_s=3600)
    background.run(follower.start())
    try:
        assert follower.channel_addresses() == {first}
        table[:] = [Replica(replica_id="e1", address=second)]
        background.run(follower.sync())
        assert follower.channel_addresses() == {second}
    finally:
        background.run(follower.close())
