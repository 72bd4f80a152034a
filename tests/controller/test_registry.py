"""The replica registry: heartbeat health, re-registration, draining and table versions."""

from __future__ import annotations

import pytest

from controller.registry import ReplicaRegistry
from switchyard.v1 import common_pb2
from tests.controller.fakes import FakeClock

READY = common_pb2.REPLICA_STATE_READY
UNHEALTHY = common_pb2.REPLICA_STATE_UNHEALTHY
DRAINING = common_pb2.REPLICA_STATE_DRAINING


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> ReplicaRegistry:
    return ReplicaRegistry(unhealthy_after_s=6.0, remove_after_s=30.0, clock=clock)


def replica(replica_id: str, port: int = 50100) -> common_pb2.Replica:
    return common_pb2.Replica(replica_id=replica_id, address=f"127.0.0.1:{port}", model="m")


def load(running: int) -> common_pb2.ReplicaLoad:
    return common_pb2.ReplicaLoad(num_running=running)


def state_of(registry: ReplicaRegistry, replica_id: str) -> int | None:
    found = registry.get(replica_id)
    return None if found is None else found.state


def routed_ids(registry: ReplicaRegistry) -> list[str]:
    return [r.replica_id for r in registry.routing_table().replicas]


def test_registered_replica_is_ready_and_routed(registry: ReplicaRegistry) -> None:
    registry.register(replica("engine-0"))
    assert state_of(registry, "engine-0") == READY
    assert routed_ids(registry) == ["engine-0"]


def test_register_rejects_missing_id_or_address(registry: ReplicaRegistry) -> None:
    with pytest.raises(ValueError):
        registry.register(common_pb2.Replica(address="127.0.0.1:1"))
    with pytest.raises(ValueError):
        registry.register(common_pb2.Replica(replica_id="engine-0"))


def test_register_ignores_the_state_the_replica_claims(registry: ReplicaRegistry) -> None:
    claimed = replica("engine-0")
    claimed.state = UNHEALTHY
    registry.register(claimed)
    assert state_of(registry, "engine-0") == READY


def test_silence_marks_unhealthy_and_leaves_the_table(
    registry: ReplicaRegistry, clock: FakeClock
) -> None:
    registry.register(replica("engine-0"))
    clock.now += 5.9
    registry.sweep()
    assert state_of(registry, "engine-0") == READY
    clock.now += 0.1
    registry.sweep()
    assert state_of(registry, "engine-0") == UNHEALTHY
    assert routed_ids(registry) == []


def test_heartbeats_keep_a_replica_ready(registry: ReplicaRegistry, clock: FakeClock) -> None:
    registry.register(replica("engine-0"))
    for _ in range(10):
        clock.now += 5.0
        assert registry.heartbeat("engine-0", load(1))
        registry.sweep()
    assert state_of(registry, "engine-0") == READY


def test_heartbeat_brings_an_unhealthy_replica_back(
    registry: ReplicaRegistry, clock: FakeClock
) -> None:
    registry.register(replica("engine-0"))
    clock.now += 10
    registry.sweep()
    assert state_of(registry, "engine-0") == UNHEALTHY
    assert registry.heartbeat("engine-0", load(0))
    assert state_of(registry, "engine-0") == READY
    assert routed_ids(registry) == ["engine-0"]


def test_long_silence_removes_and_heartbeat_then_asks_to_register(
    registry: ReplicaRegistry, clock: FakeClock
) -> None:
    registry.register(replica("engine-0"))
    clock.now += 30
    registry.sweep()
    assert registry.get("engine-0") is None
    assert registry.heartbeat("engine-0", load(0)) is False
    registry.register(replica("engine-0"))
    assert state_of(registry, "engine-0") == READY


def test_heartbeat_from_unknown_replica_is_not_known(registry: ReplicaRegistry) -> None:
    assert registry.heartbeat("nobody", load(0)) is False
    assert registry.replicas() == []


def test_reregistration_replaces_the_address(registry: ReplicaRegistry) -> None:
    registry.register(replica("engine-0", port=50100))
    registry.register(replica("engine-0", port=50200))
    assert [r.address for r in registry.routing_table().replicas] == ["127.0.0.1:50200"]


def test_deregister_leaves_the_table_at_once(registry: ReplicaRegistry) -> None:
    registry.register(replica("engine-0"))
    registry.register(replica("engine-1", port=50101))
    assert registry.deregister("engine-0")
    assert routed_ids(registry) == ["engine-1"]
    assert registry.deregister("engine-0") is False


def test_draining_survives_heartbeats_and_reregistration(registry: ReplicaRegistry) -> None:
    registry.register(replica("engine-0"))
    registry.mark_draining("engine-0")
    assert state_of(registry, "engine-0") == DRAINING
    registry.heartbeat("engine-0", load(1))
    assert state_of(registry, "engine-0") == DRAINING
    registry.deregister("engine-0")
    registry.register(replica("engine-0"))  # a late heartbeat made it register again
    assert state_of(registry, "engine-0") == DRAINING
    assert routed_ids(registry) == ["engine-0"]  # gateways see it, and route nothing new


def test_forget_clears_the_draining_mark(registry: ReplicaRegistry) -> None:
    registry.register(replica("engine-0"))
    registry.mark_draining("engine-0")
    registry.forget("engine-0")
    assert registry.get("engine-0") is None
    registry.register(replica("engine-0"))
    assert state_of(registry, "engine-0") == READY


def test_version_increments_on_every_table_change(
    registry: ReplicaRegistry, clock: FakeClock
) -> None:
    versions = [registry.version]
    registry.register(replica("engine-0"))
    versions.append(registry.version)
    registry.heartbeat("engine-0", load(3))  # load is part of the table
    versions.append(registry.version)
    registry.mark_draining("engine-0")
    versions.append(registry.version)
    registry.deregister("engine-0")
    versions.append(registry.version)
    assert versions == sorted(set(versions)), versions
    assert registry.routing_table().version == registry.version


def test_version_stays_when_nothing_routable_changes(
    registry: ReplicaRegistry, clock: FakeClock
) -> None:
    registry.register(replica("engine-0"))
    registry.heartbeat("engine-0", load(2))
    version = registry.version
    clock.now += 1
    registry.heartbeat("engine-0", load(2))  # same load, newer timestamp
    registry.sweep()
    registry.mark_draining("nobody")
    assert registry.version == version


def test_unhealthy_replica_removal_does_not_change_the_table(
    registry: ReplicaRegistry, clock: FakeClock
) -> None:
    registry.register(replica("engine-0"))
    clock.now += 10
    registry.sweep()
    version = registry.version
    clock.now += 30
    registry.sweep()
    assert registry.get("engine-0") is None
    assert registry.version == version


def test_on_change_is_called_once_per_version(clock: FakeClock) -> None:
    calls: list[int] = []
    registry = ReplicaRegistry(6.0, 30.0, clock=clock, on_change=lambda: calls.append(1))
    registry.register(replica("engine-0"))
    registry.heartbeat("engine-0", load(0))  # no change: an empty load was registered
    registry.heartbeat("engine-0", load(1))
    assert len(calls) == 2
    assert registry.version == 1 + len(calls)


def test_thresholds_must_be_ordered() -> None:
    with pytest.raises(ValueError):
        ReplicaRegistry(unhealthy_after_s=10.0, remove_after_s=5.0)
