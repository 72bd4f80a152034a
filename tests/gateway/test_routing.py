"""The least-load policy and the router's READY filter and in-flight counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest

from gateway.routing import (
    LeastLoadPolicy,
    NoReplicaAvailable,
    Replica,
    ReplicasBusy,
    RequestInfo,
    Router,
)
from switchyard.v1 import common_pb2

INFO = RequestInfo(request_id="r", model="tiny")


class FixedRoutes:
    """Test double of a routes source: holds a table the test sets."""

    def __init__(self, replicas: Sequence[Replica]) -> None:
        self.table = list(replicas)

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def replicas(self) -> Sequence[Replica]:
        return self.table


def replica(
    name: str,
    running: int = 0,
    waiting: int = 0,
    kv: float = 0.0,
    in_flight: int = 0,
    ready: bool = True,
) -> Replica:
    return Replica(
        replica_id=name,
        address=f"{name}:1",
        ready=ready,
        num_running=running,
        num_waiting=waiting,
        kv_usage=kv,
        in_flight=in_flight,
    )


def test_least_load_picks_fewest_running_plus_waiting() -> None:
    policy = LeastLoadPolicy()
    replicas = [
        replica("a", running=3),
        replica("b", running=1, waiting=1),
        replica("c", waiting=4),
    ]
    assert all(policy.select(replicas, INFO).replica_id == "b" for _ in range(5))


def test_least_load_breaks_ties_on_kv_usage() -> None:
    policy = LeastLoadPolicy()
    replicas = [replica("a", running=2, kv=0.9), replica("b", running=2, kv=0.2)]
    assert all(policy.select(replicas, INFO).replica_id == "b" for _ in range(5))


def test_least_load_counts_the_gateways_in_flight_requests() -> None:
    policy = LeastLoadPolicy()
    replicas = [replica("a", running=1, in_flight=3), replica("b", running=2)]
    assert policy.select(replicas, INFO).replica_id == "b"


def test_equal_replicas_share_requests() -> None:
    policy = LeastLoadPolicy()
    replicas = [replica("a"), replica("b"), replica("c")]
    assert {policy.select(replicas, INFO).replica_id for _ in range(3)} == {"a", "b", "c"}


def test_router_spreads_a_burst_before_heartbeats_report_it() -> None:
    router = Router(FixedRoutes([replica("a"), replica("b")]), LeastLoadPolicy())
    first = router.select(INFO)
    with router.track(first):
        second = router.select(INFO)
        assert second.replica_id != first.replica_id
        assert second.in_flight == 0
    assert router.select(INFO, exclude=frozenset({second.replica_id})).in_flight == 0


def test_router_routes_only_to_ready_replicas() -> None:
    router = Router(
        FixedRoutes([replica("down", ready=False), replica("up", running=50)]), LeastLoadPolicy()
    )
    assert all(router.select(INFO).replica_id == "up" for _ in range(4))


def test_router_skips_excluded_replicas_and_reports_none_left() -> None:
    router = Router(FixedRoutes([replica("a"), replica("b")]), LeastLoadPolicy())
    assert router.select(INFO, exclude=frozenset({"a"})).replica_id == "b"
    with pytest.raises(NoReplicaAvailable):
        router.select(INFO, exclude=frozenset({"a", "b"}))


def test_replica_from_proto_is_ready_only_in_ready_state() -> None:
    load = common_pb2.ReplicaLoad(num_running=2, num_waiting=1, kv_usage=0.5)
    ready = Replica.from_proto(
        common_pb2.Replica(
            replica_id="e1",
            address="h:1",
            state=common_pb2.REPLICA_STATE_READY,
            load=load,
            max_model_len=128,
        )
    )
    draining = Replica.from_proto(
        common_pb2.Replica(replica_id="e2", address="h:2", state=common_pb2.REPLICA_STATE_DRAINING)
    )
    assert (ready.ready, ready.num_running, ready.num_waiting, ready.max_model_len) == (
        True,
        2,
        1,
        128,
    )
    assert not draining.ready


def test_a_replica_at_its_reported_capacity_is_skipped_and_all_full_is_busy() -> None:
    full = Replica(replica_id="a", address="a:1", max_num_seqs=2, max_queued_requests=1)
    spare = Replica(replica_id="b", address="b:1", max_num_seqs=2, max_queued_requests=1)
    router = Router(FixedRoutes([full, spare]), LeastLoadPolicy())
    for _ in range(3):
        router._in_flight["a"] = router._in_flight.get("a", 0) + 1
    assert router.select(INFO).replica_id == "b"
    router._in_flight["b"] = 3
    with pytest.raises(ReplicasBusy):
        router.select(INFO)
    router._in_flight["b"] = 2
    assert router.select(INFO).replica_id == "b", "a replica below its bound takes requests at once"


def test_the_configured_per_replica_bound_overrides_the_reported_capacity() -> None:
    unbounded = Replica(replica_id="a", address="a:1")
    router = Router(FixedRoutes([unbounded]), LeastLoadPolicy(), max_in_flight_per_replica=2)
    router._in_flight["a"] = 2
    with pytest.raises(ReplicasBusy):
        router.select(INFO)
    with pytest.raises(NoReplicaAvailable) as none_ready:
        Router(FixedRoutes([replace(unbounded, ready=False)]), LeastLoadPolicy()).select(INFO)
    assert not isinstance(none_ready.value, ReplicasBusy)
