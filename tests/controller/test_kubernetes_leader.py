"""Leader election on a coordination Lease, against the loopback double of the Kubernetes API
(no API server can run here): one candidate leads, a stale Lease is taken over, a released one
at once, a race is settled by resourceVersion, and a leader that cannot renew steps down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from controller.kube_api import KubeApi
from controller.leader import LeadershipLost, LeaseElector
from tests.controller.kubernetes_api_double import NAMESPACE, TOKEN, KubeApiDouble

pytestmark = pytest.mark.asyncio
LEASE = "switchyard-controller"


@pytest_asyncio.fixture
async def api() -> AsyncIterator[tuple[KubeApiDouble, KubeApi]]:
    double = KubeApiDouble()
    client = KubeApi(double.url, token=TOKEN)
    yield double, client
    await client.aclose()
    double.close()


def elector(client: KubeApi, identity: str) -> LeaseElector:
    return LeaseElector(client, NAMESPACE, LEASE, identity, lease_duration_s=1)


def holder(double: KubeApiDouble) -> str | None:
    lease = double.lease(LEASE)
    return None if lease is None else lease["spec"]["holderIdentity"]


async def test_one_candidate_leads_and_the_other_waits(api: tuple[KubeApiDouble, KubeApi]) -> None:
    double, client = api
    a, b = elector(client, "a"), elector(client, "b")
    await asyncio.wait_for(a.acquire(), timeout=2)
    assert holder(double) == "a"
    assert not await b.try_acquire_or_renew()
    assert await a.try_acquire_or_renew()  # renewing keeps it
    lease = double.lease(LEASE)
    assert lease is not None and lease["spec"]["leaseTransitions"] == 0


async def test_a_lease_nobody_renews_is_taken_over_after_its_duration(
    api: tuple[KubeApiDouble, KubeApi],
) -> None:
    double, client = api
    await elector(client, "a").acquire()  # and then "a" dies without releasing
    b = elector(client, "b")
    started = time.monotonic()
    await asyncio.wait_for(b.acquire(), timeout=5)
    assert time.monotonic() - started >= 1.0  # not before the Lease's duration ran out
    lease = double.lease(LEASE)
    assert lease is not None
    assert (lease["spec"]["holderIdentity"], lease["spec"]["leaseTransitions"]) == ("b", 1)


async def test_a_released_lease_is_taken_at_once(api: tuple[KubeApiDouble, KubeApi]) -> None:
    double, client = api
    a = elector(client, "a")
    await a.acquire()
    await a.release()
    assert holder(double) is None
    assert await elector(client, "b").try_acquire_or_renew()
    assert holder(double) == "b"


async def test_two_candidates_racing_for_a_free_lease_cannot_both_win(
    api: tuple[KubeApiDouble, KubeApi],
) -> None:
    double, client = api
    results = await asyncio.gather(
        *(elector(client, name).try_acquire_or_renew() for name in ("a", "b", "c"))
    )
    assert sorted(results) == [False, False, True]
    assert holder(double) == ["a", "b", "c"][results.index(True)]


async def test_a_leader_that_cannot_renew_steps_down_before_the_lease_expires(
    api: tuple[KubeApiDouble, KubeApi],
) -> None:
    double, client = api
    a = elector(client, "a")
    await a.acquire()
    renewed_at = time.monotonic()
    double.set_fail_leases(True)
    with pytest.raises(LeadershipLost):
        await asyncio.wait_for(a.hold(), timeout=3)
    assert time.monotonic() - renewed_at < 1.0  # before anyone else may take over
