"""Adapter affinity: a LoRA request goes to a replica that already holds its adapter.

A replica *holds* an adapter when the adapter is resident in its device slots, or the
controller's placement gives it the adapter (it will be resident there soon). Among those
the least loaded wins, unless it has more than ``load_guard`` requests more than the least
loaded replica overall: then that one takes the request and loads the adapter from its host
cache or disk (every replica has every adapter registered). Requests for the base model go
to the policy this one wraps.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.routing import Replica, RequestInfo, RoutingPolicy, replica_load

DEFAULT_LOAD_GUARD = 4


class AdapterAffinityPolicy(RoutingPolicy):
    def __init__(self, inner: RoutingPolicy, load_guard: int = DEFAULT_LOAD_GUARD) -> None:
        self.inner = inner
        self.load_guard = load_guard

    def select(self, replicas: Sequence[Replica], request_info: RequestInfo) -> Replica:
        adapter = request_info.adapter
        if not adapter:
            return self.inner.select(replicas, request_info)
        least = min(replicas, key=_load_key)
        holders = [r for r in replicas if adapter in r.adapters or adapter in r.placed_adapters]
        if not holders:
            return least
        best = min(holders, key=_load_key)
        if replica_load(best) - replica_load(least) > self.load_guard:
            return least
        return best


def _load_key(replica: Replica) -> tuple[int, float, str]:
    return replica_load(replica), replica.kv_usage, replica.replica_id
