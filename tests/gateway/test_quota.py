"""The two quota stores decide alike: the same sliding windows, budgets and revocation, in
memory and in a real ``redis-server``. Time is passed in, so the windows are exact."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from gateway.api_keys import KeyLimits, KeyRecord, hash_key
from gateway.quota import DefaultLimits, MemoryQuota, QuotaStore, RedisQuota
from tests.support import RedisServer, redis_server_binary

T0 = 1_700_000_000_000  # ms
NO_DEFAULTS = DefaultLimits()


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[QuotaStore]:  # type: ignore[no-untyped-def]
    if request.param == "memory":
        yield MemoryQuota()
        return
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("no redis-server binary")
    server = RedisServer(binary, str(tmp_path))
    yield RedisQuota(server.url)
    server.stop()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def key(limits: KeyLimits, name: str = "k") -> KeyRecord:
    return KeyRecord("key_" + name, hash_key(name), name=name, limits=limits)


async def admit_at(
    store: QuotaStore, record: KeyRecord, at_ms: int, defaults: DefaultLimits = NO_DEFAULTS
):  # type: ignore[no-untyped-def]
    admission = await store.admit(record.key_hash, str(at_ms), defaults, at_ms)
    if admission.status == "ok":
        await store.settle(record.id, 0, at_ms)
    return admission


def test_requests_slide_out_of_the_window(store: QuotaStore) -> None:
    record = key(KeyLimits(rpm=2))

    async def scenario():  # type: ignore[no-untyped-def]
        await store.put_key(record)
        first = await admit_at(store, record, T0)
        second = await admit_at(store, record, T0 + 10_000)
        refused = await admit_at(store, record, T0 + 20_000)
        again = await admit_at(store, record, T0 + 60_001)
        return first, second, refused, again

    first, second, refused, again = run(scenario())
    assert (first.status, first.remaining_requests) == ("ok", 1)
    assert (second.status, second.remaining_requests) == ("ok", 0)
    assert refused.status == "requests"
    assert refused.retry_after_ms == 40_000  # when the first request leaves the window
    assert again.status == "ok"


def test_tokens_are_charged_when_requests_settle(store: QuotaStore) -> None:
    record = key(KeyLimits(tpm=100))

    async def scenario():  # type: ignore[no-untyped-def]
        await store.put_key(record)
        admitted = await store.admit(record.key_hash, "a", DefaultLimits(), T0)
        await store.settle(record.id, 120, T0 + 500)
        refused = await admit_at(store, record, T0 + 30_000)
        later = await admit_at(store, record, T0 + 61_000)
        return admitted, refused, later, await store.spent(record.id)

    admitted, refused, later, spent = run(scenario())
    assert (admitted.status, admitted.remaining_tokens) == ("ok", 100)
    assert refused.status == "tokens"
    assert refused.retry_after_ms == 30_000
    assert later.status == "ok"
    assert spent == 120


def test_defaults_apply_to_limits_left_unset_and_zero_is_unlimited(store: QuotaStore) -> None:
    unset, unlimited = key(KeyLimits(), "unset"), key(KeyLimits(rpm=0), "unlimited")
    defaults = DefaultLimits(rpm=1)

    async def scenario():  # type: ignore[no-untyped-def]
        await store.put_key(unset)
        await store.put_key(unlimited)
        statuses = []
        for record in (unset, unset, unlimited, unlimited):
            statuses.append((await admit_at(store, record, T0, defaults)).status)
        return statuses

    assert run(scenario()) == ["ok", "requests", "ok", "ok"]


def test_budget_revocation_and_unknown_keys(store: QuotaStore) -> None:
    record = key(KeyLimits(budget=10))

    async def scenario():  # type: ignore[no-untyped-def]
        await store.put_key(record)
        await store.admit(record.key_hash, "a", DefaultLimits(), T0)
        await store.settle(record.id, 10, T0)
        spent = await admit_at(store, record, T0 + 1)
        await store.update_key(record.id, limits={"budget": None}, revoked=None)
        unbudgeted = await admit_at(store, record, T0 + 2)
        await store.update_key(record.id, limits={}, revoked=True)
        revoked = await admit_at(store, record, T0 + 3)
        await store.put_key(record)  # re-registering a revoked key keeps it revoked
        still = await admit_at(store, record, T0 + 4)
        unknown = await store.admit(hash_key("nobody"), "z", DefaultLimits(), T0)
        return spent, unbudgeted, revoked, still, unknown

    spent, unbudgeted, revoked, still, unknown = run(scenario())
    assert spent.status == "budget"
    assert unbudgeted.status == "ok"
    assert revoked.status == "revoked"
    assert still.status == "revoked"
    assert unknown.status == "unknown"
