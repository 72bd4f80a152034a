"""The replica registry: which engines exist, how healthy they are, and the routing table.

Engines tell the registry about themselves (``register``, ``heartbeat``, ``deregister``); the
reconcile loop ages them (``sweep``) and marks the ones it is stopping (``mark_draining``).
Health follows heartbeats only::

    register ──▶ READY ──(silent unhealthy_after_s)──▶ UNHEALTHY ──(silent remove_after_s)──▶ gone
                   ▲  └────────── heartbeat ◀──────────────┘
    mark_draining: READY ──▶ DRAINING (stays DRAINING across heartbeats and re-registration,
                   until lift_draining or forget)

The routing table holds the READY and DRAINING replicas. Its ``version`` goes up exactly when
its contents change (membership, address, state, load; heartbeat timestamps do not count), so
a gateway that has seen version ``v`` has seen everything up to it.

The registry is synchronous and takes its clock as an argument, so that tests drive time;
``on_change`` is called after every version bump (the server wakes its route watchers).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from switchyard.v1 import common_pb2, controller_pb2

ROUTABLE_STATES = (common_pb2.REPLICA_STATE_READY, common_pb2.REPLICA_STATE_DRAINING)


@dataclass(slots=True)
class _Record:
    replica: common_pb2.Replica
    last_seen: float  # on the registry's clock


class ReplicaRegistry:
    """Replicas by id, their health by heartbeats, and the versioned routing table."""

    def __init__(
        self,
        unhealthy_after_s: float,
        remove_after_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        if not 0 < unhealthy_after_s <= remove_after_s:
            raise ValueError("need 0 < unhealthy_after_s <= remove_after_s")
        self._unhealthy_after_s = unhealthy_after_s
        self._remove_after_s = remove_after_s
        self._clock = clock
        self._on_change = on_change
        self._records: dict[str, _Record] = {}
        self._draining: set[str] = set()
        self._version = 1  # 0 is left for "no table seen yet"
        self._contents = self._table_contents()

    @property
    def version(self) -> int:
        return self._version

    def register(self, replica: common_pb2.Replica) -> None:
        """Adds or replaces a replica; it is READY at once (DRAINING if it is being stopped)."""
        if not replica.replica_id:
            raise ValueError("replica_id is empty")
        if not replica.address:
            raise ValueError("address is empty")
        stored = common_pb2.Replica()
        stored.CopyFrom(replica)
        stored.load.SetInParent()  # so that a first heartbeat of zeros changes nothing
        stored.state = self._serving_state(replica.replica_id)
        stored.last_heartbeat_unix = time.time()
        self._records[replica.replica_id] = _Record(stored, self._clock())
        self._after_change()

    def heartbeat(
        self,
        replica_id: str,
        load: common_pb2.ReplicaLoad,
        lora_adapters: Sequence[common_pb2.LoRAAdapterInfo] | None = None,
    ) -> bool:
        """Records a beat, its load and (when given) the LoRA adapters the replica holds;
        False when the replica is unknown (it must register)."""
        record = self._records.get(replica_id)
        if record is None:
            return False
        record.last_seen = self._clock()
        record.replica.last_heartbeat_unix = time.time()
        record.replica.load.CopyFrom(load)
        if lora_adapters is not None:
            _set_adapters(record.replica, lora_adapters)
        record.replica.state = self._serving_state(replica_id)
        self._after_change()
        return True

    def set_lora_adapters(
        self, replica_id: str, lora_adapters: Sequence[common_pb2.LoRAAdapterInfo]
    ) -> None:
        """What a replica holds after a load or unload the controller made, ahead of its
        next heartbeat."""
        record = self._records.get(replica_id)
        if record is not None:
            _set_adapters(record.replica, lora_adapters)
            self._after_change()

    def set_placement(self, placement: Mapping[str, Sequence[str]]) -> None:
        """The adapters the LoRA placement gives each replica (``placed_adapters``)."""
        for replica_id, record in self._records.items():
            placed = list(placement.get(replica_id, ()))
            if list(record.replica.placed_adapters) != placed:
                del record.replica.placed_adapters[:]
                record.replica.placed_adapters.extend(placed)
        self._after_change()

    def deregister(self, replica_id: str) -> bool:
        """Removes a replica at once; False when it was not registered."""
        found = self._records.pop(replica_id, None) is not None
        self._after_change()
        return found

    def mark_draining(self, replica_id: str) -> None:
        """Keeps a replica that is being stopped out of new routing, but in the table."""
        self._draining.add(replica_id)
        record = self._records.get(replica_id)
        if record is not None and record.replica.state == common_pb2.REPLICA_STATE_READY:
            record.replica.state = common_pb2.REPLICA_STATE_DRAINING
        self._after_change()

    def lift_draining(self, replica_id: str) -> None:
        """Undoes ``mark_draining``: the replica is routable again (READY if registered)."""
        self._draining.discard(replica_id)
        record = self._records.get(replica_id)
        if record is not None and record.replica.state == common_pb2.REPLICA_STATE_DRAINING:
            record.replica.state = common_pb2.REPLICA_STATE_READY
        self._after_change()

    def forget(self, replica_id: str) -> None:
        """Drops every trace of a replica whose process is gone (record and draining mark)."""
        self._draining.discard(replica_id)
        self._records.pop(replica_id, None)
        self._after_change()

    def sweep(self) -> None:
        """Marks silent replicas UNHEALTHY and removes the ones silent for too long."""
        now = self._clock()
        for replica_id, record in list(self._records.items()):
            silent_s = now - record.last_seen
            if silent_s >= self._remove_after_s:
                del self._records[replica_id]
            elif silent_s >= self._unhealthy_after_s:
                record.replica.state = common_pb2.REPLICA_STATE_UNHEALTHY
        self._after_change()

    def get(self, replica_id: str) -> common_pb2.Replica | None:
        record = self._records.get(replica_id)
        return record.replica if record is not None else None

    def replicas(self) -> list[common_pb2.Replica]:
        """Every registered replica, in any state, sorted by id."""
        return [self._records[replica_id].replica for replica_id in sorted(self._records)]

    def routing_table(self) -> controller_pb2.RoutingTable:
        """The READY and DRAINING replicas with the current version."""
        routable = [r for r in self.replicas() if r.state in ROUTABLE_STATES]
        return controller_pb2.RoutingTable(version=self._version, replicas=routable)

    def _serving_state(self, replica_id: str) -> int:
        if replica_id in self._draining:
            return common_pb2.REPLICA_STATE_DRAINING
        return common_pb2.REPLICA_STATE_READY

    def _table_contents(self) -> tuple[bytes, ...]:
        """The routable replicas as comparable bytes, heartbeat times left out: the version
        goes up when these change."""
        contents = []
        for replica in self.replicas():
            if replica.state not in ROUTABLE_STATES:
                continue
            comparable = common_pb2.Replica()
            comparable.CopyFrom(replica)
            comparable.ClearField("last_heartbeat_unix")
            contents.append(comparable.SerializeToString(deterministic=True))
        return tuple(contents)

    def _after_change(self) -> None:
        contents = self._table_contents()
        if contents != self._contents:
            self._contents = contents
            self._version += 1
            if self._on_change is not None:
                self._on_change()


def _set_adapters(
    replica: common_pb2.Replica, lora_adapters: Sequence[common_pb2.LoRAAdapterInfo]
) -> None:
    del replica.lora_adapters[:]
    replica.lora_adapters.extend(lora_adapters)
    del replica.adapters[:]
    replica.adapters.extend(a.name for a in lora_adapters if a.resident)
