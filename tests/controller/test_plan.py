"""The scale plan: what to create, restart and stop for a desired pool size."""

from __future__ import annotations

import pytest

from controller.backend import Instance, Phase
from controller.plan import RestartPolicy, plan_pool

POLICY = RestartPolicy(backoff_initial_s=1.0, backoff_max_s=8.0, start_timeout_s=100.0)
NOW = 1000.0


def instance(
    ordinal: int,
    phase: Phase = Phase.RUNNING,
    started_at: float = NOW - 10,
    exited_at: float | None = None,
    failures: int = 0,
) -> Instance:
    return Instance(
        replica_id=f"engine-{ordinal}",
        ordinal=ordinal,
        phase=phase,
        started_at=started_at,
        exited_at=exited_at,
        failures=failures,
        address=f"127.0.0.1:{50100 + ordinal}",
    )


def registered_all(*instances: Instance) -> set[str]:
    return {i.replica_id for i in instances}


def test_empty_pool_creates_fresh_ordinals() -> None:
    plan = plan_pool("engines", 2, [], set(), next_ordinal=0, now=NOW, policy=POLICY)
    assert plan.create == [("engine-0", 0), ("engine-1", 1)]
    assert plan.stop == [] and plan.restart == []


def test_pool_at_size_plans_nothing() -> None:
    pool = [instance(0), instance(1)]
    plan = plan_pool("engines", 2, pool, registered_all(*pool), 2, NOW, POLICY)
    assert not plan


def test_scale_up_never_reuses_an_ordinal() -> None:
    pool = [instance(3)]
    plan = plan_pool("engines", 3, pool, registered_all(*pool), 7, NOW, POLICY)
    assert plan.create == [("engine-7", 7), ("engine-8", 8)]


def test_scale_down_stops_the_newest() -> None:
    pool = [instance(0), instance(1), instance(2)]
    plan = plan_pool("engines", 1, pool, registered_all(*pool), 3, NOW, POLICY)
    assert sorted(plan.stop) == ["engine-1", "engine-2"]
    assert plan.create == []


def test_scale_down_stops_crashed_replicas_first() -> None:
    crashed = instance(0, Phase.EXITED, exited_at=NOW - 1, failures=1)
    pool = [crashed, instance(1), instance(2)]
    plan = plan_pool("engines", 2, pool, registered_all(*pool), 3, NOW, POLICY)
    assert plan.stop == ["engine-0"]
    assert plan.restart == []


def test_stopping_replicas_do_not_count_and_are_not_stopped_again() -> None:
    pool = [instance(0), instance(1, Phase.STOPPING)]
    plan = plan_pool("engines", 2, pool, registered_all(*pool), 2, NOW, POLICY)
    assert plan.stop == []
    assert plan.create == [("engine-2", 2)]


def test_crashed_replica_restarts_after_its_backoff() -> None:
    crashed = instance(0, Phase.EXITED, exited_at=NOW - 3.9, failures=3)  # backoff 4 s
    assert plan_pool("engines", 1, [crashed], set(), 1, NOW, POLICY).restart == []
    crashed = instance(0, Phase.EXITED, exited_at=NOW - 4.0, failures=3)
    plan = plan_pool("engines", 1, [crashed], set(), 1, NOW, POLICY)
    assert plan.restart == ["engine-0"]
    assert plan.create == []  # restarted in place, not replaced


@pytest.mark.parametrize(
    ("failures", "backoff_s"), [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (10, 8.0)]
)
def test_backoff_doubles_up_to_its_cap(failures: int, backoff_s: float) -> None:
    assert POLICY.backoff_s(failures) == backoff_s


def test_replica_that_never_registers_is_replaced() -> None:
    slow = instance(0, started_at=NOW - 99)
    assert not plan_pool("engines", 1, [slow], set(), 1, NOW, POLICY)
    stuck = instance(0, started_at=NOW - 100)
    plan = plan_pool("engines", 1, [stuck], set(), 1, NOW, POLICY)
    assert plan.stop == ["engine-0"]
    assert plan.create == [("engine-1", 1)]


def test_registered_replica_is_not_replaced_however_old() -> None:
    old = instance(0, started_at=NOW - 10_000)
    assert not plan_pool("engines", 1, [old], {"engine-0"}, 1, NOW, POLICY)


def test_scale_to_zero_stops_everything() -> None:
    pool = [instance(0), instance(1, Phase.EXITED, exited_at=NOW, failures=1)]
    plan = plan_pool("engines", 0, pool, registered_all(*pool), 2, NOW, POLICY)
    assert sorted(plan.stop) == ["engine-0", "engine-1"]
    assert plan.create == [] and plan.restart == []


def test_negative_desired_is_refused() -> None:
    with pytest.raises(ValueError):
        plan_pool("engines", -1, [], set(), 0, NOW, POLICY)
