"""The scale plan: from the desired size of a pool and what its backend observes, the replicas
to create, to restart and to stop. A pure function, so that every case is a unit test.

Rules, applied to the replicas that are not already stopping:

- too many: stop the surplus, crashed ones first, then the newest;
- too few: create new replicas with fresh ordinals (ids are never reused, so that a late
  heartbeat from a stopped replica can never be mistaken for its successor);
- a crashed replica that is kept restarts once its backoff has passed
  (``backoff_initial_s * 2**(failures-1)``, capped at ``backoff_max_s``);
- a running replica that has not registered ``start_timeout_s`` after its start (it hangs
  while loading, or it went silent and the registry dropped it) is stopped and replaced.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from controller.backend import Instance, Phase


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    start_timeout_s: float = 600.0

    def backoff_s(self, failures: int) -> float:
        return min(self.backoff_initial_s * 2 ** max(failures - 1, 0), self.backoff_max_s)


@dataclass(slots=True)
class PoolPlan:
    create: list[tuple[str, int]] = field(default_factory=list)  # (replica_id, ordinal)
    restart: list[str] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.create or self.restart or self.stop)


def replica_id_for(pool: str, ordinal: int) -> str:
    return f"{pool.removesuffix('s')}-{ordinal}"


def plan_pool(
    pool: str,
    desired: int,
    instances: Sequence[Instance],
    registered: Collection[str],
    next_ordinal: int,
    now: float,
    policy: RestartPolicy,
) -> PoolPlan:
    """What to do so that ``desired`` replicas of ``pool`` run; ``registered`` holds the ids
    the registry knows (in any state), ``next_ordinal`` the first ordinal never used."""
    if desired < 0:
        raise ValueError("desired must be >= 0")
    plan = PoolPlan()
    alive = [i for i in instances if i.phase is not Phase.STOPPING]
    # Crashed ones sort first (key False), then the newest: the surplus is the head.
    by_removal = sorted(alive, key=lambda i: (i.phase is not Phase.EXITED, -i.ordinal))
    surplus = max(len(alive) - desired, 0)
    plan.stop = [i.replica_id for i in by_removal[:surplus]]
    kept = by_removal[surplus:]

    replaced = 0
    for instance in sorted(kept, key=lambda i: i.ordinal):
        if instance.phase is Phase.EXITED:
            exited_at = instance.exited_at if instance.exited_at is not None else now
            if now >= exited_at + policy.backoff_s(instance.failures):
                plan.restart.append(instance.replica_id)
        elif (
            instance.replica_id not in registered
            and now - instance.started_at >= policy.start_timeout_s
        ):
            plan.stop.append(instance.replica_id)
            replaced += 1

    missing = desired - len(kept) + replaced
    plan.create = [
        (replica_id_for(pool, ordinal), ordinal)
        for ordinal in range(next_ordinal, next_ordinal + max(missing, 0))
    ]
    return plan
