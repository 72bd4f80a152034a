"""Routing with prefill and decode roles: requests run on decode (or ordinary) replicas,
picked by load and free KV when a prefill replica computes the prompt; the prefill replica
is picked by the policy among those whose KV layout matches the decode replica's."""

from __future__ import annotations

from gateway.prefix_index import PrefixIndex
from gateway.prefix_policy import PrefixAwarePolicy
from gateway.routing import LeastLoadPolicy, Replica, RequestInfo, Router
from switchyard.v1 import common_pb2
from tests.gateway.test_routing import FixedRoutes

PREFILL, DECODE = common_pb2.REPLICA_ROLE_PREFILL, common_pb2.REPLICA_ROLE_DECODE
INFO = RequestInfo(request_id="r", model="tiny", prompt_token_ids=list(range(64)))


def role(name: str, kind: int, running: int = 0, kv: float = 0.0, fp: bytes = b"m") -> Replica:
    return Replica(
        replica_id=name,
        address=f"{name}:1",
        num_running=running,
        kv_usage=kv,
        role=kind,
        kv_fingerprint=fp,
    )


def test_requests_run_on_decode_replicas_never_on_prefill_ones() -> None:
    router = Router(
        FixedRoutes([role("p0", PREFILL), role("d0", DECODE, running=9)]), LeastLoadPolicy()
    )
    assert {router.select(INFO).replica_id for _ in range(4)} == {"d0"}


def test_prefill_replicas_serve_whole_requests_when_nothing_else_is_ready() -> None:
    router = Router(FixedRoutes([role("p0", PREFILL)]), LeastLoadPolicy())
    assert router.select(INFO).replica_id == "p0"
    assert router.select_prefill(INFO, router.select(INFO)) is None


def test_a_disaggregated_request_takes_the_decode_replica_with_most_free_kv() -> None:
    table = [role("d0", DECODE, running=1, kv=0.9), role("d1", DECODE, running=1, kv=0.2)]
    router = Router(FixedRoutes([*table, role("p0", PREFILL)]), LeastLoadPolicy())
    assert router.select(INFO, disaggregated=True).replica_id == "d1"


def test_the_prefill_replica_matches_the_decode_replicas_kv_layout() -> None:
    table = [role("p-other", PREFILL, fp=b"other"), role("p-same", PREFILL, running=5)]
    router = Router(FixedRoutes([*table, role("d0", DECODE)]), LeastLoadPolicy())
    decode = router.select(INFO, disaggregated=True)
    assert router.select_prefill(INFO, decode).replica_id == "p-same"


def test_the_prefill_replica_is_picked_by_load_and_prefix() -> None:
    table = [role("p0", PREFILL, running=3), role("p1", PREFILL), role("d0", DECODE)]
    least = Router(FixedRoutes(table), LeastLoadPolicy())
    assert least.select_prefill(INFO, least.select(INFO)).replica_id == "p1"

    index = PrefixIndex()
    prefix = Router(FixedRoutes(table), PrefixAwarePolicy(index, load_guard=8))
    for name in ("p0", "p1", "d0"):
        index.reset(name, block_size=16)
    index.note_routed("p0", INFO.prompt_token_ids, ())  # p0 computed this prompt before
    assert prefix.select_prefill(INFO, prefix.select(INFO)).replica_id == "p0"
