"""The autoscaler (off by default): sizes the engine pool from the load the engines report in
their heartbeats, waiting requests and KV-cache usage, within ``[min, max]`` and no more often
than once per cooldown.

The rule is the Horizontal Pod Autoscaler's, on two signals at once::

    ratio   = max(mean num_waiting / target_waiting, mean kv_usage / target_kv_usage)
    desired = ceil(ready * ratio)        unless |ratio - 1| <= tolerance (then: unchanged)

over the READY replicas. It never shrinks the pool while some of it is still coming up (fewer
READY replicas than desired): those are not idle, they are not there yet. The pool applies the
order (:class:`~controller.backend.EnginePool`); the autoscaler only decides, so it runs on the
leader only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from controller.backend import EnginePool
from controller.registry import ReplicaRegistry
from switchyard.v1 import common_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AutoscalePolicy:
    min_replicas: int
    max_replicas: int
    target_waiting: float  # waiting requests per ready replica
    target_kv_usage: float  # 0..1 per ready replica
    cooldown_s: float
    tolerance: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 1 <= min_replicas <= max_replicas")
        if self.target_waiting <= 0 or not 0 < self.target_kv_usage <= 1:
            raise ValueError("need target_waiting > 0 and 0 < target_kv_usage <= 1")

    def clamp(self, replicas: int) -> int:
        return min(max(replicas, self.min_replicas), self.max_replicas)


def autoscale_target(
    desired: int, loads: Sequence[common_pb2.ReplicaLoad], policy: AutoscalePolicy
) -> int:
    """The size the pool should have, given the load of its READY replicas."""
    if not loads:  # nothing measured: only the bounds apply
        return policy.clamp(desired)
    waiting = sum(load.num_waiting for load in loads) / len(loads)
    kv_usage = sum(load.kv_usage for load in loads) / len(loads)
    ratio = max(waiting / policy.target_waiting, kv_usage / policy.target_kv_usage)
    if abs(ratio - 1.0) <= policy.tolerance:
        return policy.clamp(desired)
    proposed = math.ceil(len(loads) * ratio - 1e-9)  # 2 * 1.5 is 3, not 4
    if proposed < desired and len(loads) < desired:
        proposed = desired
    return policy.clamp(proposed)


class Autoscaler:
    """Applies :func:`autoscale_target` to ``pool`` every ``interval_s`` (see the module
    docstring); ``clock`` is monotonic seconds."""

    def __init__(
        self,
        pool: EnginePool,
        registry: ReplicaRegistry,
        policy: AutoscalePolicy,
        interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._registry = registry
        self._policy = policy
        self._interval_s = interval_s
        self._clock = clock
        self._last_change: float | None = None

    def tick(self) -> int | None:
        """One decision; returns the size it ordered, or None when it ordered nothing."""
        if not self._pool.desired_known:
            return None  # scaling from a size not read yet would undo the real one
        now = self._clock()
        if self._last_change is not None and now - self._last_change < self._policy.cooldown_s:
            return None
        loads = [
            replica.load
            for replica in self._registry.replicas()
            if replica.state == common_pb2.REPLICA_STATE_READY
        ]
        desired = self._pool.desired
        target = autoscale_target(desired, loads, self._policy)
        if target == desired:
            return None
        self._pool.scale(target)
        self._last_change = now
        log.info(
            "autoscaling engines",
            extra={
                "previous": desired,
                "desired": target,
                "ready": len(loads),
                "waiting": sum(load.num_waiting for load in loads),
            },
        )
        return target

    async def run(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(self._interval_s)
