"""The reconcile loop: observe the registry and the backend, plan, act, repeat.

One tick ages the registry (heartbeat timeouts), reads what the backend runs, reconciles the
two views (a replica whose process is gone leaves the registry; one being stopped stays marked
DRAINING), computes a :class:`~controller.plan.PoolPlan` against the desired size and applies
it. Every action is idempotent and nothing is assumed to have worked: the next tick observes
again. Ticks run every ``interval_s`` and at once after a scale order.

One thing ends the loop instead of being retried: a replica whose backend reports that it
cannot start (``Instance.cannot_start``: a bad flag, an unsupported model, missing files).
Every restart would fail the same way, so :meth:`Reconciler.run` raises
:class:`EngineCannotStart` with the replica's own message and the process decides what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from controller.backend import Backend, Instance, Phase
from controller.plan import PoolPlan, RestartPolicy, plan_pool
from controller.registry import ReplicaRegistry
from switchyard.v1 import common_pb2

log = logging.getLogger(__name__)

ENGINE_POOL = "engines"
# Prefill/decode disaggregation: pools of engines started with --role prefill / decode.
PREFILL_POOL = "prefill-engines"
DECODE_POOL = "decode-engines"
POOL_ROLES = {ENGINE_POOL: "both", PREFILL_POOL: "prefill", DECODE_POOL: "decode"}

_UNREGISTERED_STATE = {
    Phase.RUNNING: common_pb2.REPLICA_STATE_STARTING,
    Phase.EXITED: common_pb2.REPLICA_STATE_UNHEALTHY,
    Phase.STOPPING: common_pb2.REPLICA_STATE_DRAINING,
}


class EngineCannotStart(Exception):
    """A replica failed at start in a way no restart fixes; ``message`` is its own words."""

    def __init__(self, replica_id: str, message: str) -> None:
        super().__init__(f"{replica_id} cannot start: {message}")
        self.replica_id = replica_id
        self.message = message


class Reconciler:
    """Keeps the engine pool at its desired size (see the module docstring)."""

    def __init__(
        self,
        registry: ReplicaRegistry,
        backend: Backend,
        desired: int,
        policy: RestartPolicy,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        on_scale: Callable[[int], None] | None = None,
        pool: str = ENGINE_POOL,
    ) -> None:
        """``on_scale`` hears every desired size, the first one included (the local backend
        records it for a controller that may follow). ``pool`` names the pool, and through
        it its replicas (``prefill-engines`` runs ``prefill-engine-0``, ...)."""
        if desired < 0:
            raise ValueError("desired must be >= 0")
        self.pool = pool
        self._registry = registry
        self._backend = backend
        self._desired = desired
        self._policy = policy
        self._interval_s = interval_s
        self._clock = clock
        self._instances: list[Instance] = []
        self._next_ordinal = 0
        self._wake = asyncio.Event()
        self._on_scale = on_scale
        if on_scale is not None:
            on_scale(desired)

    @property
    def desired(self) -> int:
        return self._desired

    @property
    def desired_known(self) -> bool:
        return True  # the reconciler's own setting

    def scale(self, replicas: int) -> int:
        """Sets the desired size and wakes the loop; returns the previous size."""
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        previous, self._desired = self._desired, replicas
        if self._on_scale is not None:
            self._on_scale(replicas)
        self._wake.set()
        return previous

    def instances(self) -> list[Instance]:
        """What the backend ran at the end of the last tick."""
        return list(self._instances)

    async def reconcile_once(self) -> PoolPlan:
        """One observe-plan-act pass; returns the plan it applied."""
        self._registry.sweep()
        instances = await self._observe()
        self._sync_registry(instances)
        for instance in instances:
            if instance.cannot_start:
                self._instances = instances
                raise EngineCannotStart(instance.replica_id, instance.cannot_start)
        plan = plan_pool(
            self.pool,
            self._desired,
            instances,
            registered={r.replica_id for r in self._registry.replicas()},
            next_ordinal=self._next_ordinal,
            now=self._clock(),
            policy=self._policy,
        )
        if plan:
            log.info(
                "applying plan",
                extra={
                    "pool": self.pool,
                    "desired": self._desired,
                    "create": [replica_id for replica_id, _ in plan.create],
                    "restart": plan.restart,
                    "stop": plan.stop,
                },
            )
        ordinals = {i.replica_id: i.ordinal for i in instances}
        for replica_id in plan.stop:
            self._registry.mark_draining(replica_id)
            await self._backend.stop(replica_id)
        for replica_id in plan.restart:
            await self._backend.start(replica_id, ordinals[replica_id])
        for replica_id, ordinal in plan.create:
            await self._backend.start(replica_id, ordinal)
        self._instances = await self._observe()
        return plan

    async def _observe(self) -> list[Instance]:
        # Ordinals advance only past replicas seen to exist: a start that did not happen is
        # retried under the same id, and an id once seen is never given out again.
        instances = await self._backend.observe()
        if instances:
            self._next_ordinal = max(self._next_ordinal, instances[-1].ordinal + 1)
        return instances

    async def run(self) -> None:
        """Ticks until cancelled; a failing tick is logged and the next one tries again,
        except :class:`EngineCannotStart`, which ends the loop."""
        while True:
            try:
                await self.reconcile_once()
            except EngineCannotStart:
                raise
            except Exception:
                log.exception("reconcile tick failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._interval_s)

    def _sync_registry(self, instances: list[Instance]) -> None:
        observed = {i.replica_id: i for i in instances}
        for previous in self._instances:
            if previous.replica_id not in observed:  # stopped and gone
                self._registry.forget(previous.replica_id)
        for instance in instances:
            if instance.phase is Phase.EXITED and self._registry.get(instance.replica_id):
                self._registry.forget(instance.replica_id)  # dead: route nothing more to it
            elif instance.phase is Phase.STOPPING:
                self._registry.mark_draining(instance.replica_id)

    def replica_views(self) -> list[common_pb2.Replica]:
        """Registered replicas, plus the backend's replicas that have not registered (yet):
        STARTING while their process runs, UNHEALTHY while it waits for a restart, DRAINING
        while it stops."""
        views = {r.replica_id: r for r in self._registry.replicas()}
        for instance in self._instances:
            if instance.replica_id in views:
                continue
            state = _UNREGISTERED_STATE[instance.phase]
            views[instance.replica_id] = common_pb2.Replica(
                replica_id=instance.replica_id, address=instance.address, state=state
            )
        return [views[replica_id] for replica_id in sorted(views, key=lambda i: (len(i), i))]
