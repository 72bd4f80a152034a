"""The seam between the reconcile loop and whatever runs replicas (local processes), and the
narrower one, :class:`EnginePool`, that the Kubernetes backend shares with the reconcile loop.

A backend reports what exists (``observe``) and takes small idempotent orders (``start``,
``stop``); it never waits for a replica to become ready: readiness is what the replica tells
the registry, and the reconcile loop reads both.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

from switchyard.v1 import common_pb2


class Phase(enum.Enum):
    """What the backend sees of one replica's process or pod."""

    RUNNING = "running"  # alive and wanted (it may still be loading its model)
    EXITED = "exited"  # ended without being asked to: a crash, awaiting restart
    STOPPING = "stopping"  # asked to stop, not yet gone


@dataclass(frozen=True, slots=True)
class Instance:
    """One replica as its backend observes it."""

    replica_id: str
    ordinal: int  # creation order within the pool; larger is newer
    phase: Phase
    started_at: float  # time.monotonic() of the current (or last) start
    exited_at: float | None  # set in phase EXITED
    failures: int  # consecutive crashes; reset by a run that lasted long enough
    address: str  # host:port its engine serves on; "" when unknown
    # Set in phase EXITED when the process said a restart cannot help (a bad flag, an
    # unsupported model, missing files): the replica's own message.
    cannot_start: str = ""


class Backend(ABC):
    """Runs the replicas of the engine pool.

    Contract: every method returns promptly and is safe to call again with the same
    arguments; ``start`` of a RUNNING or STOPPING replica and ``stop`` of an unknown one do
    nothing. A stopped replica moves to STOPPING and then disappears from ``observe``; a
    replica that dies on its own shows as EXITED until ``start`` runs it again (the reconcile
    loop decides when, with backoff). ``close`` stops every replica and waits for them.
    """

    @abstractmethod
    async def observe(self) -> list[Instance]:
        """Every replica the backend runs or is stopping, sorted by ordinal."""

    @abstractmethod
    async def start(self, replica_id: str, ordinal: int) -> None:
        """Creates the replica, or runs an EXITED one again."""

    @abstractmethod
    async def stop(self, replica_id: str) -> None:
        """Begins a graceful stop; the backend forces it after its grace period."""

    @abstractmethod
    async def close(self) -> None:
        """Stops every replica, forcing those that outlive the grace period."""


class EnginePool(Protocol):
    """What the controller's service and autoscaler need of whatever keeps the engine pool at
    its size: the :class:`~controller.reconciler.Reconciler` over a :class:`Backend`, or the
    Kubernetes pool, which follows a Deployment instead (Kubernetes creates and deletes its
    pods; see :mod:`controller.kubernetes_backend`).

    ``scale`` records the new size and returns the previous one at once; the pool's own loop
    applies it, and retries until it holds.
    """

    @property
    def desired(self) -> int: ...

    @property
    def desired_known(self) -> bool:
        """Whether ``desired`` is the pool's real size yet (a pool that follows a
        Deployment learns it from the API first)."""
        ...

    def scale(self, replicas: int) -> int: ...

    def replica_views(self) -> list[common_pb2.Replica]: ...
