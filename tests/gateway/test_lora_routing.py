"""LoRA at the gateway: ``model`` to adapter, the adapters' model cards, and affinity
routing (a replica holding the adapter wins, within the load guard)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.errors import OpenAIError
from gateway.lora_policy import AdapterAffinityPolicy
from gateway.lora_routes import AdapterCatalog
from gateway.routing import LeastLoadPolicy, NoReplicaAvailable, Replica, RequestInfo, Router
from switchyard.v1 import common_pb2
from tests.gateway.test_routing import FixedRoutes

BASE = "tiny"
REGISTERED = (("sql", "/adapters/sql"), ("chat", "org/chat-lora"))


def lora_replica(name: str, running: int = 0, resident=(), placed=(), registered=REGISTERED):
    return Replica(
        replica_id=name,
        address=f"{name}:1",
        num_running=running,
        adapters=tuple(resident),
        placed_adapters=tuple(placed),
        lora_adapters=tuple(registered),
        max_loras=2,
    )


def request(adapter: str = "") -> RequestInfo:
    return RequestInfo(request_id="r", model=BASE, adapter=adapter)


def test_the_model_field_selects_an_adapter_by_name_or_base_colon_name():
    catalog = AdapterCatalog(Router(FixedRoutes([lora_replica("a")]), LeastLoadPolicy()), BASE)
    assert catalog.resolve(BASE) == ""
    assert catalog.resolve("sql") == "sql"
    assert catalog.resolve(f"{BASE}:chat") == "chat"
    for unknown in ("nope", "other:sql", f"{BASE}:nope"):
        with pytest.raises(OpenAIError) as info:
            catalog.resolve(unknown)
        assert info.value.status == 404 and info.value.code == "model_not_found"


def test_adapter_cards_name_the_base_as_parent_and_the_path_as_root():
    catalog = AdapterCatalog(Router(FixedRoutes([lora_replica("a")]), LeastLoadPolicy()), BASE)
    cards = {c.id: c for c in catalog.cards(created=1)}
    assert cards["sql"].parent == BASE and cards["sql"].root == "/adapters/sql"
    assert cards["chat"].root == "org/chat-lora"


def test_a_replica_holding_the_adapter_wins_over_a_less_loaded_one():
    policy = AdapterAffinityPolicy(LeastLoadPolicy(), load_guard=4)
    replicas = [
        lora_replica("idle"),
        lora_replica("resident", running=2, resident=["sql"]),
        lora_replica("placed", running=3, placed=["chat"]),
    ]
    assert policy.select(replicas, request("sql")).replica_id == "resident"
    assert policy.select(replicas, request("chat")).replica_id == "placed"
    assert policy.select(replicas, request()).replica_id == "idle"  # base: least load


def test_the_load_guard_sends_a_request_away_from_an_overloaded_holder():
    policy = AdapterAffinityPolicy(LeastLoadPolicy(), load_guard=4)
    replicas = [lora_replica("idle"), lora_replica("busy", running=5, resident=["sql"])]
    assert policy.select(replicas, request("sql")).replica_id == "idle"
    replicas[1] = replace(replicas[1], num_running=4)
    assert policy.select(replicas, request("sql")).replica_id == "busy"


def test_an_adapter_nobody_holds_goes_to_the_least_loaded():
    policy = AdapterAffinityPolicy(LeastLoadPolicy())
    replicas = [lora_replica("a", running=2), lora_replica("b", running=1)]
    assert policy.select(replicas, request("sql")).replica_id == "b"


def test_the_router_only_sends_an_adapter_to_replicas_that_registered_it():
    only_sql = (("sql", "/adapters/sql"),)
    table = [lora_replica("has-both"), lora_replica("sql-only", registered=only_sql)]
    table[0] = replace(table[0], num_running=9)
    router = Router(FixedRoutes(table), AdapterAffinityPolicy(LeastLoadPolicy()))
    assert router.select(request("chat")).replica_id == "has-both"
    assert router.select(request("sql")).replica_id == "sql-only"
    with pytest.raises(NoReplicaAvailable, match="adapter 'chat'"):
        router.select(request("chat"), exclude=frozenset({"has-both"}))


def test_replicas_carry_the_adapters_of_the_routing_table():
    proto = common_pb2.Replica(
        replica_id="e",
        address="e:1",
        state=common_pb2.REPLICA_STATE_READY,
        adapters=["sql"],
        placed_adapters=["chat"],
        max_loras=4,
        lora_adapters=[common_pb2.LoRAAdapterInfo(name="sql", path="/a", resident=True)],
    )
    converted = Replica.from_proto(proto)
    assert converted.lora_adapters == (("sql", "/a"),) and converted.max_loras == 4
    assert converted.adapters == ("sql",) and converted.placed_adapters == ("chat",)


def test_prefix_routing_hashes_an_adapters_prompt_with_its_fingerprint_as_engines_do():
    """The replica holding the prompt's blocks *under the adapter's fingerprint* wins; one
    holding the same tokens for the base model does not."""
    from gateway.prefix_index import PrefixIndex
    from gateway.prefix_policy import PrefixAwarePolicy
    from switchyard.block_hash import block_extra_keys, chained_block_hashes, lora_adapter_key
    from tests.gateway.test_prefix_routing import BLOCK, DEVICE

    prompt = list(range(10, 42))
    fingerprints = (("sql", "f" * 32),)
    under_adapter = chained_block_hashes(
        prompt, BLOCK, block_extra_keys(lora_adapter_key("f" * 32))
    )
    index = PrefixIndex()
    for name in ("base-holder", "adapter-holder", "idle"):
        index.reset(name, BLOCK)
    index.apply("base-holder", True, DEVICE, chained_block_hashes(prompt, BLOCK))
    index.apply("adapter-holder", True, DEVICE, under_adapter)
    replicas = [
        replace(lora_replica(name, running=r), lora_fingerprints=fingerprints)
        for name, r in (("base-holder", 0), ("adapter-holder", 1), ("idle", 0))
    ]
    policy = PrefixAwarePolicy(index)
    info = RequestInfo(request_id="r", model=BASE, prompt_token_ids=prompt, adapter="sql")
    assert policy.select(replicas, info).replica_id == "adapter-holder"
    base_info = replace(info, adapter="")
    assert policy.select(replicas, base_info).replica_id == "base-holder"
