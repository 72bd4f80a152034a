"""The reconcile loop against an in-memory backend: it converges on the desired size, retries
what did not happen, and keeps the registry in step with the processes."""

from __future__ import annotations

import asyncio

from controller.backend import Phase
from controller.plan import RestartPolicy
from controller.reconciler import Reconciler
from controller.registry import ReplicaRegistry
from switchyard.v1 import common_pb2
from tests.controller.fakes import FakeBackend, FakeClock

POLICY = RestartPolicy(backoff_initial_s=2.0, backoff_max_s=8.0, start_timeout_s=100.0)


class Harness:
    def __init__(self, desired: int) -> None:
        self.clock = FakeClock()
        self.registry = ReplicaRegistry(6.0, 30.0, clock=self.clock)
        self.backend = FakeBackend(self.clock)
        self.reconciler = Reconciler(self.registry, self.backend, desired, POLICY, clock=self.clock)

    def tick(self) -> None:
        asyncio.run(self.reconciler.reconcile_once())

    def register_all_running(self) -> None:
        for instance in self.backend.instances.values():
            if instance.phase is Phase.RUNNING:
                self.registry.register(
                    common_pb2.Replica(replica_id=instance.replica_id, address=instance.address)
                )

    def running_ids(self) -> list[str]:
        return sorted(
            i.replica_id for i in self.backend.instances.values() if i.phase is Phase.RUNNING
        )

    def routed_ids(self) -> list[str]:
        return [r.replica_id for r in self.registry.routing_table().replicas]


def test_converges_on_the_desired_size_and_then_does_nothing() -> None:
    h = Harness(desired=2)
    h.tick()
    assert h.running_ids() == ["engine-0", "engine-1"]
    h.register_all_running()
    h.tick()
    h.tick()
    assert h.backend.starts == ["engine-0", "engine-1"]


def test_start_that_did_not_happen_is_retried() -> None:
    h = Harness(desired=1)
    h.backend.ignore_starts = True
    h.tick()
    h.backend.ignore_starts = False
    h.tick()
    assert h.running_ids() == ["engine-0"]
    assert h.backend.starts == ["engine-0", "engine-0"]


def test_scale_down_drains_then_forgets_the_newest() -> None:
    h = Harness(desired=2)
    h.tick()
    h.register_all_running()
    assert h.reconciler.scale(1) == 2
    h.tick()
    assert h.backend.stops == ["engine-1"]
    assert h.registry.get("engine-1").state == common_pb2.REPLICA_STATE_DRAINING
    h.tick()
    assert h.backend.stops == ["engine-1"]  # already stopping: not ordered twice
    h.backend.finish_stop("engine-1")
    h.tick()
    assert h.registry.get("engine-1") is None
    assert h.routed_ids() == ["engine-0"]


def test_crashed_replica_leaves_the_table_and_restarts_after_backoff() -> None:
    h = Harness(desired=1)
    h.tick()
    h.register_all_running()
    h.backend.crash("engine-0")
    h.tick()
    assert h.routed_ids() == []
    assert h.backend.starts == ["engine-0"]
    h.clock.now += POLICY.backoff_s(1)
    h.tick()
    assert h.backend.starts == ["engine-0", "engine-0"]
    assert h.running_ids() == ["engine-0"]


def test_ordinals_are_not_reused_after_scale_down_and_up() -> None:
    h = Harness(desired=2)
    h.tick()
    h.reconciler.scale(1)
    h.tick()
    h.backend.finish_stop("engine-1")
    h.tick()
    h.reconciler.scale(2)
    h.tick()
    assert h.running_ids() == ["engine-0", "engine-2"]


def test_replica_silent_until_removed_is_replaced() -> None:
    h = Harness(desired=1)
    h.tick()
    h.register_all_running()
    h.clock.now += 100  # no heartbeats: UNHEALTHY, then removed; started 100 s ago
    h.tick()
    assert h.backend.stops == ["engine-0"]
    assert h.running_ids() == ["engine-1"]


def test_replica_views_show_unregistered_processes_as_starting() -> None:
    h = Harness(desired=1)
    h.tick()
    views = h.reconciler.replica_views()
    assert [(v.replica_id, v.state) for v in views] == [
        ("engine-0", common_pb2.REPLICA_STATE_STARTING)
    ]
    assert views[0].address == "127.0.0.1:50100"
