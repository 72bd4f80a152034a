"""The LoRA placement plan: spreads, replicates hot adapters, respects capacity, is stable,
and survives a replica leaving."""

from __future__ import annotations

from controller.lora_placement import ReplicaSlots, plan_lora_placement

ALL = frozenset({"a", "b", "c", "d"})


def _replicas(n: int, capacity: int = 2, registered: frozenset[str] = ALL) -> list[ReplicaSlots]:
    return [ReplicaSlots(f"engine-{i}", capacity, registered) for i in range(n)]


def _copies(plan: dict[str, list[str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for adapters in plan.values():
        for adapter in adapters:
            counts[adapter] = counts.get(adapter, 0) + 1
    return counts


def test_cold_adapters_spread_one_copy_each_over_the_replicas():
    plan = plan_lora_placement(dict.fromkeys("abcd", 0.0), _replicas(4, capacity=1))
    assert _copies(plan) == dict.fromkeys("abcd", 1)
    assert all(len(adapters) == 1 for adapters in plan.values())


def test_a_hot_adapter_is_replicated_and_cold_ones_still_get_a_slot():
    plan = plan_lora_placement({"a": 90, "b": 5, "c": 5}, _replicas(4, capacity=2))
    copies = _copies(plan)
    assert copies["a"] == 4  # 90% of 8 slots, capped at the 4 replicas
    assert copies["b"] >= 1 and copies["c"] >= 1


def test_no_replica_holds_more_than_its_max_loras():
    replicas = [ReplicaSlots("big", 3, ALL), ReplicaSlots("small", 1, ALL)]
    plan = plan_lora_placement({"a": 10, "b": 8, "c": 6, "d": 4}, replicas)
    assert len(plan["big"]) <= 3 and len(plan["small"]) <= 1
    assert sum(len(v) for v in plan.values()) == 4


def test_only_replicas_that_registered_an_adapter_get_it():
    replicas = [ReplicaSlots("x", 2, frozenset({"a"})), ReplicaSlots("y", 2, frozenset({"b"}))]
    plan = plan_lora_placement({"a": 1, "b": 1, "zzz": 50}, replicas)
    assert plan == {"x": ["a"], "y": ["b"]}


def test_an_unchanged_fleet_keeps_its_placement():
    replicas = _replicas(3, capacity=1)
    first = plan_lora_placement({"a": 1, "b": 1, "c": 1}, replicas)
    previous = {k: frozenset(v) for k, v in first.items()}
    # Replicas listed in another order, demand nudged: the same placement.
    again = plan_lora_placement({"a": 1.1, "b": 1, "c": 0.9}, replicas[::-1], previous)
    assert again == first


def test_a_replica_leaving_has_its_adapters_placed_again_on_the_rest():
    replicas = _replicas(3, capacity=2)
    first = plan_lora_placement({"a": 1, "b": 1, "c": 1}, replicas)
    gone = "engine-1"
    previous = {k: frozenset(v) for k, v in first.items()}
    after = plan_lora_placement(
        {"a": 1, "b": 1, "c": 1}, [r for r in replicas if r.replica_id != gone], previous
    )
    assert gone not in after
    assert set(_copies(after)) == {"a", "b", "c"}
    # What stayed placed on the remaining replicas did not move.
    for replica_id, adapters in after.items():
        assert set(first[replica_id]) <= set(adapters)


def test_no_slots_or_no_adapters_places_nothing():
    assert plan_lora_placement({}, _replicas(2)) == {"engine-0": [], "engine-1": []}
    assert plan_lora_placement({"a": 1}, _replicas(2, capacity=0)) == {
        "engine-0": [],
        "engine-1": [],
    }
