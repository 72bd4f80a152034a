"""LoRA placement: which replicas each adapter is placed on. A pure function, so that every
case is a unit test; the controller applies its result to the routing table, where the
gateway's affinity policy reads it.

Every replica has every adapter *registered* (it can serve any of them, reading one it does
not hold from host memory or disk); *placing* an adapter on a replica says that its
requests should go there, so that it stays in that replica's device slots. Rules:

- a replica holds at most ``capacity`` (its ``max_loras``) placed adapters, and only
  adapters it has registered;
- every adapter gets one copy first (hottest first, while slots last); then each gets
  extra copies up to ``floor(share * total slots)`` in all, at most one per replica that
  has it, where ``share`` is its part of the observed demand (adapters with no demand yet
  count as one request each): hot adapters are replicated, cold ones keep one copy;
- a copy goes where the adapter was placed before (no churn while nothing changes), else
  to the replica with the most free slots (spreading), ties by replica id;
- a replica that left is simply absent from ``replicas``: its adapters are placed again on
  those that remain.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReplicaSlots:
    replica_id: str
    capacity: int  # the replica's max_loras
    registered: frozenset[str]  # adapters it can serve


def plan_lora_placement(
    demand: Mapping[str, float],
    replicas: Sequence[ReplicaSlots],
    previous: Mapping[str, frozenset[str]] | None = None,
) -> dict[str, list[str]]:
    """Replica id -> the adapters placed on it (sorted), for every replica given.

    ``demand``: adapter name -> recent requests (any non-negative scale); adapters that no
    replica has registered are ignored. ``previous``: the last plan, replica id -> adapters.
    """
    previous = previous or {}
    placed: dict[str, list[str]] = {r.replica_id: [] for r in replicas}
    free = {r.replica_id: max(r.capacity, 0) for r in replicas}
    servable = sorted({a for r in replicas for a in r.registered if a in demand})
    if not servable:
        return placed
    weight = {a: max(demand[a], 0.0) or 1.0 for a in servable}
    total_weight = sum(weight.values())
    total_slots = sum(free.values())
    hottest_first = sorted(servable, key=lambda a: (-weight[a], a))
    # One copy of each adapter first (while slots last), then the extra copies hot ones
    # earn: floor(share * total slots) in all.
    extra = {a: math.floor(weight[a] / total_weight * total_slots) - 1 for a in servable}
    for round_copies in ({a: 1 for a in servable}, extra):
        for adapter in hottest_first:
            copies = round_copies[adapter]
            ranked = sorted(
                (r for r in replicas if adapter in r.registered),
                key=lambda r: (
                    adapter not in previous.get(r.replica_id, frozenset()),
                    -free[r.replica_id],
                    r.replica_id,
                ),
            )
            for replica in ranked:
                if copies <= 0:
                    break
                holding = placed[replica.replica_id]
                if free[replica.replica_id] > 0 and adapter not in holding:
                    holding.append(adapter)
                    free[replica.replica_id] -= 1
                    copies -= 1
    return {replica_id: sorted(adapters) for replica_id, adapters in placed.items()}
