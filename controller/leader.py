"""Leader election on a ``coordination.k8s.io/v1`` Lease, so that of several controller
replicas exactly one acts (follows the pool, serves engines and gateways, autoscales).

- A candidate takes the Lease when nobody holds it, or when its record (holder, renewTime,
  transitions) has not changed for the Lease's ``leaseDurationSeconds`` as measured on the
  candidate's own clock since it first saw that record: nodes' clocks need not agree.
- Every write carries the resourceVersion read just before it, so of two candidates racing
  for one Lease the second gets 409 Conflict and stays a candidate.
- The leader renews every third of the duration. One that has not renewed for two thirds of
  it gives up (:meth:`LeaseElector.hold` returns) before any candidate may take over; the
  controller then exits and comes back as a candidate.
- On a clean stop the leader releases the Lease (no holder), so a candidate takes it at its
  next try instead of after a full duration.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import httpx

from controller.kube_api import ApiError, Conflict, Json, KubeApi

log = logging.getLogger(__name__)


class LeadershipLost(Exception):
    """The Lease could not be renewed in time: another replica may lead now."""


def _micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    """Takes and holds the Lease ``namespace/name`` as ``identity`` (see the module docstring)."""

    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        name: str,
        identity: str,
        lease_duration_s: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if lease_duration_s < 1:
            raise ValueError("lease_duration_s must be >= 1 (the API counts whole seconds)")
        self._api = api
        self._namespace = namespace
        self._name = name
        self.identity = identity
        self._duration_s = lease_duration_s
        self._clock = clock
        self._observed: tuple[str, str, int] | None = None
        self._observed_at = 0.0
        self._last_renewed: float | None = None

    @property
    def retry_s(self) -> float:
        return self._duration_s / 3

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this replica holds the Lease afterwards."""
        lease = await self._api.get_lease(self._namespace, self._name)
        now = _micro_time()
        if lease is None:
            spec = self._spec(acquire_time=now, renew_time=now, transitions=0)
            body = {"metadata": {"name": self._name, "namespace": self._namespace}, "spec": spec}
            return await self._write(self._api.create_lease, body)
        spec = lease.get("spec") or {}
        holder = str(spec.get("holderIdentity") or "")
        transitions = int(spec.get("leaseTransitions") or 0)
        record = (holder, str(spec.get("renewTime") or ""), transitions)
        if record != self._observed:
            self._observed, self._observed_at = record, self._clock()
        held_for_s = int(spec.get("leaseDurationSeconds") or self._duration_s)
        if holder and holder != self.identity:
            if self._clock() - self._observed_at < held_for_s:
                return False
            log.info("lease expired; taking it over", extra={"previous_holder": holder})
        ours = holder == self.identity
        acquire_time = str(spec.get("acquireTime") or now) if ours else now
        body = {
            "metadata": {
                "name": self._name,
                "namespace": self._namespace,
                "resourceVersion": lease["metadata"]["resourceVersion"],
            },
            "spec": self._spec(acquire_time, now, transitions if ours else transitions + 1),
        }
        return await self._write(self._api.replace_lease, body)

    async def acquire(self) -> None:
        """Returns once this replica leads."""
        log.info("waiting for the controller lease", extra={"identity": self.identity})
        while not await self._attempt():
            await asyncio.sleep(self.retry_s)
        log.info("leading", extra={"identity": self.identity, "lease": self._name})

    async def hold(self) -> None:
        """Renews until a renewal is overdue; then raises :class:`LeadershipLost`."""
        deadline_s = self._duration_s * 2 / 3
        while True:
            await asyncio.sleep(self.retry_s)
            if not await self._attempt():
                assert self._last_renewed is not None  # acquire() renewed first
                if self._clock() - self._last_renewed >= deadline_s:
                    raise LeadershipLost(f"lease {self._name} not renewed for {deadline_s:.1f} s")

    async def release(self) -> None:
        """Gives the Lease up if this replica holds it (a clean stop)."""
        try:
            lease = await self._api.get_lease(self._namespace, self._name)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"]["holderIdentity"] = None
            lease["spec"]["renewTime"] = _micro_time()
            await self._api.replace_lease(self._namespace, lease)
            log.info("lease released", extra={"identity": self.identity})
        except (httpx.HTTPError, ApiError) as exc:
            log.warning("could not release the lease", extra={"error": repr(exc)})

    async def _attempt(self) -> bool:
        try:
            held = await self.try_acquire_or_renew()
        except (httpx.HTTPError, ApiError, ValueError, KeyError) as exc:
            log.warning("lease request failed", extra={"error": repr(exc)})
            return False
        if held:
            self._last_renewed = self._clock()
        return held

    async def _write(self, call: Callable[[str, Json], Awaitable[Json]], body: Json) -> bool:
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", **body}
        try:
            await call(self._namespace, body)
        except Conflict:
            return False  # another candidate wrote first
        return True

    def _spec(self, acquire_time: str, renew_time: str, transitions: int) -> Json:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self._duration_s,
            "acquireTime": acquire_time,
            "renewTime": renew_time,
            "leaseTransitions": transitions,
        }
