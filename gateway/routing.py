"""Choosing a replica for a request: the routing table, the policy, and in-flight counts.

The table comes from a :class:`RoutesSource` (the controller's ``WatchRoutes`` stream, or a
static list of engines; see :mod:`gateway.route_sources`). Only READY replicas get traffic.
A :class:`RoutingPolicy` picks among them; the :class:`Router` adds what the policy cannot
see in the table: how many requests this gateway has sent to each replica and not yet seen
finish, so a burst spreads out before the next heartbeat reports it.

A request's session id (the header named by ``GatewaySettings.session_header``) reaches the
policy through :data:`session_id_var`, which the gateway's middleware sets per request.

Passive health: a replica whose connection failed (the engine client reports it through
:meth:`Router.mark_unreachable`) is left out for ``unreachable_for_s`` without waiting for the
controller to notice; after that one request may find out again whether it answers. A
response from it (:meth:`Router.mark_reachable`) or its leaving the routing table clears the
mark. ``/health`` counts only replicas that are READY and not marked.

Prefill/decode disaggregation: replicas carry a role (prefill, decode, or both). Requests go
to decode and both replicas; prefill replicas are never the one a request runs on. With
:meth:`Router.select_prefill` the engine client picks, for a long enough prompt, a prefill
replica (by the policy: prefix-aware with the prefix policy, else least load) whose KV
layout matches the decode replica's, and the decode replica imports the prompt's KV from it.
While prefill replicas exist, the decode replica itself is the least loaded with the most
free KV (its prompt arrives as KV; the decode phase is what it runs).
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Protocol

from switchyard.block_hash import MediaSpan
from switchyard.v1 import common_pb2

# The session id of the request being handled ("" when it sent none).
session_id_var: ContextVar[str] = ContextVar("session_id", default="")


@dataclass(slots=True, frozen=True)
class Replica:
    """One engine replica as the gateway routes to it.

    ``in_flight`` is this gateway's own count of unfinished requests on the replica; the
    load figures are the replica's last heartbeat.
    """

    replica_id: str
    address: str
    model: str = ""
    ready: bool = True
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    max_model_len: int = 0
    adapters: tuple[str, ...] = ()  # LoRA adapters resident in its device slots
    in_flight: int = 0
    max_num_seqs: int = 0  # 0: not reported
    max_queued_requests: int = 0  # 0: unbounded (or not reported)
    # LoRA: every adapter registered on it, as (name, path); those the controller's
    # placement gives it; how many fit its device at once (0: LoRA off).
    lora_adapters: tuple[tuple[str, str], ...] = ()
    placed_adapters: tuple[str, ...] = ()
    max_loras: int = 0
    lora_fingerprints: tuple[tuple[str, str], ...] = ()  # (name, content fingerprint)
    role: int = common_pb2.REPLICA_ROLE_UNSPECIFIED  # ReplicaRole: both, prefill or decode
    kv_fingerprint: bytes = b""  # the KV layout's fingerprint; b"": not reported

    @property
    def is_prefill(self) -> bool:
        return self.role == common_pb2.REPLICA_ROLE_PREFILL

    def serves_adapter(self, name: str) -> bool:
        return any(registered == name for registered, _ in self.lora_adapters)

    @classmethod
    def from_proto(cls, replica: common_pb2.Replica) -> Replica:
        return cls(
            replica_id=replica.replica_id or replica.address,
            address=replica.address,
            model=replica.model,
            ready=replica.state == common_pb2.REPLICA_STATE_READY,
            num_running=replica.load.num_running,
            num_waiting=replica.load.num_waiting,
            kv_usage=replica.load.kv_usage,
            max_model_len=replica.max_model_len,
            adapters=tuple(replica.adapters),
            max_num_seqs=replica.load.max_num_seqs,
            max_queued_requests=replica.load.max_queued_requests,
            lora_adapters=tuple((a.name, a.path) for a in replica.lora_adapters),
            lora_fingerprints=tuple((a.name, a.fingerprint) for a in replica.lora_adapters),
            placed_adapters=tuple(replica.placed_adapters),
            max_loras=replica.max_loras,
            role=replica.role,
            kv_fingerprint=replica.kv_fingerprint,
        )

    def capacity(self) -> int:
        """The most requests it runs and keeps waiting together (0: unknown or unbounded)."""
        if self.max_num_seqs and self.max_queued_requests:
            return self.max_num_seqs + self.max_queued_requests
        return 0


@dataclass(slots=True)
class RequestInfo:
    """What a policy may weigh about the request being routed."""

    request_id: str
    model: str
    prompt_token_ids: Sequence[int] = field(default_factory=list)
    session_id: str = ""
    adapter: str = ""  # the LoRA adapter the request runs with; "" for the base model
    cache_salt: str = ""  # isolates the request's prefix cache (vLLM's ``cache_salt``)
    # The prompt's images: their placeholder spans with content hashes (block keys).
    media: Sequence[MediaSpan] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class _ReadySet:
    """The routable replicas of one routing table (``table``), and what requests ask of them."""

    table: Sequence[Replica]
    replicas: tuple[Replica, ...]
    has_prefill: bool
    max_model_len: int | None  # the smallest reported context; None when none reports one

    @classmethod
    def of(cls, table: Sequence[Replica], unreachable: Collection[str]) -> _ReadySet:
        replicas = tuple(
            replica for replica in table if replica.ready and replica.replica_id not in unreachable
        )
        lengths = [replica.max_model_len for replica in replicas if replica.max_model_len > 0]
        return cls(
            table,
            replicas,
            any(replica.is_prefill for replica in replicas),
            min(lengths) if lengths else None,
        )


class RoutesSource(Protocol):
    """Where the routing table comes from; ``replicas`` is the latest table, READY or not.
    A table is replaced whole, never edited in place, so that users may tell a new one by
    its identity."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def replicas(self) -> Sequence[Replica]: ...


class RoutingPolicy(ABC):
    """Picks one of the candidate replicas for a request.

    ``replicas`` is never empty, holds only READY replicas, and carries this gateway's
    in-flight counts. ``select`` must not block or await: it runs on every request.
    """

    @abstractmethod
    def select(self, replicas: Sequence[Replica], request_info: RequestInfo) -> Replica: ...


class LeastLoadPolicy(RoutingPolicy):
    """Fewest requests (running + waiting + this gateway's in-flight), then least KV in use.

    Ties rotate, so that idle replicas share a burst instead of the first one taking it all.
    The in-flight count overlaps the heartbeat's running count once a heartbeat includes the
    request; the overlap biases every replica alike, and it is what keeps bursts spread.
    """

    def __init__(self) -> None:
        self._turn = itertools.count()

    def select(self, replicas: Sequence[Replica], request_info: RequestInfo) -> Replica:
        start = next(self._turn) % len(replicas)
        rotated = [*replicas[start:], *replicas[:start]]
        return min(rotated, key=lambda r: (replica_load(r), r.kv_usage))


def replica_load(replica: Replica) -> int:
    """Requests on the replica: running, waiting, and sent by this gateway meanwhile."""
    return replica.num_running + replica.num_waiting + replica.in_flight


class RoundRobinPolicy(RoutingPolicy):
    """Each replica in turn, blind to load and cache: the baseline the others are measured by."""

    def __init__(self) -> None:
        self._turn = itertools.count()

    def select(self, replicas: Sequence[Replica], request_info: RequestInfo) -> Replica:
        ordered = sorted(replicas, key=lambda r: r.replica_id)
        return ordered[next(self._turn) % len(ordered)]


class NoReplicaAvailable(Exception):
    """No READY replica is left to try for a request."""


class ReplicasBusy(NoReplicaAvailable):
    """Every READY replica left to try already holds as many of this gateway's requests as
    its bound allows."""


class Router:
    """Selects replicas through a policy and keeps this gateway's in-flight counts and its
    marks on unreachable replicas (see the module docstring).

    A replica is skipped while this gateway has as many requests in flight on it as its
    bound: ``max_in_flight_per_replica`` when set, else the capacity the replica reports
    (``max_num_seqs + max_queued_requests``), so that a full replica gets no more before it
    has to refuse them. Only this gateway's own count is used for the bound: the reported
    queue depth is a heartbeat old, and a drained replica must take requests at once.
    """

    def __init__(
        self,
        source: RoutesSource,
        policy: RoutingPolicy,
        *,
        max_in_flight_per_replica: int = 0,
        unreachable_for_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.policy = policy
        self.max_in_flight_per_replica = max_in_flight_per_replica
        self._in_flight: dict[str, int] = {}
        self._unreachable_for_s = unreachable_for_s
        self._clock = clock
        self._unreachable_until: dict[str, float] = {}  # replica id -> end of its mark
        self._ready_cache: _ReadySet | None = None  # for the table it names, without marks

    def mark_unreachable(self, replica: Replica) -> None:
        """The connection to ``replica`` failed: route nothing to it for a while."""
        self._unreachable_until[replica.replica_id] = self._clock() + self._unreachable_for_s

    def mark_reachable(self, replica: Replica) -> None:
        """``replica`` answered: it is routable again at once."""
        self._unreachable_until.pop(replica.replica_id, None)

    def ready_replicas(self) -> list[Replica]:
        """READY replicas of the routing table that are not marked unreachable."""
        return list(self._ready().replicas)

    def _ready(self) -> _ReadySet:
        """The routable replicas, worked out once per routing table: every request asks (its
        context length, the prefill replicas, the pick), and a table is replaced whole, never
        edited, so its identity says whether it changed. While a replica is marked
        unreachable the set is worked out each time: marks lapse with the clock."""
        replicas = self.source.replicas()
        if self._unreachable_until:
            self._expire_marks(replicas)
            if self._unreachable_until:
                return _ReadySet.of(replicas, self._unreachable_until)
        ready = self._ready_cache
        if ready is None or ready.table is not replicas:
            ready = self._ready_cache = _ReadySet.of(replicas, {})
        return ready

    def _expire_marks(self, replicas: Sequence[Replica]) -> None:
        now = self._clock()
        listed = {replica.replica_id for replica in replicas}
        for replica_id, until in list(self._unreachable_until.items()):
            if until <= now or replica_id not in listed:
                del self._unreachable_until[replica_id]

    def max_model_len(self) -> int | None:
        """The smallest context any READY replica reports (None when none reports one)."""
        return self._ready().max_model_len

    def select(
        self,
        request_info: RequestInfo,
        exclude: frozenset[str] = frozenset(),
        *,
        disaggregated: bool = False,
    ) -> Replica:
        """A READY replica not in ``exclude`` (replica ids), holding the request's LoRA
        adapter if it names one, and below its bound; raises ``NoReplicaAvailable`` when
        none is ready, ``ReplicasBusy`` when all are full. Prefill replicas are left out
        while any other replica is ready (see the module docstring); with ``disaggregated``
        (a prefill replica computes the prompt) the pick is by load and free KV rather than
        the policy."""
        adapter = request_info.adapter
        ready = [
            self._with_in_flight(replica)
            for replica in self._ready().replicas
            if replica.replica_id not in exclude
            and (not adapter or replica.serves_adapter(adapter))
        ]
        if any(not replica.is_prefill for replica in ready):
            ready = [replica for replica in ready if not replica.is_prefill]
        if not ready:
            held = f" holding adapter {adapter!r}" if adapter else ""
            raise NoReplicaAvailable(f"no engine replica{held} is ready to serve the request")
        candidates = [replica for replica in ready if not self._full(replica)]
        if not candidates:
            raise ReplicasBusy("every engine replica is at capacity")
        if not request_info.session_id and (session_id := session_id_var.get()):
            request_info = replace(request_info, session_id=session_id)
        if disaggregated:
            return min(candidates, key=lambda r: (replica_load(r), r.kv_usage, r.replica_id))
        return self.policy.select(candidates, request_info)

    def has_prefill_replicas(self) -> bool:
        """Whether any READY prefill replica is routable now."""
        return self._ready().has_prefill

    def select_prefill(self, request_info: RequestInfo, decode: Replica) -> Replica | None:
        """A READY prefill replica, below its bound, whose KV layout matches ``decode``'s,
        picked by the policy (prefix-aware with the prefix policy); None when there is none
        (the decode replica then computes the prompt itself)."""
        candidates = [
            self._with_in_flight(replica)
            for replica in self._ready().replicas
            if replica.is_prefill
            and replica.replica_id != decode.replica_id
            and (
                not replica.kv_fingerprint
                or not decode.kv_fingerprint
                or replica.kv_fingerprint == decode.kv_fingerprint
            )
        ]
        candidates = [replica for replica in candidates if not self._full(replica)]
        if not candidates:
            return None
        if not request_info.session_id and (session_id := session_id_var.get()):
            request_info = replace(request_info, session_id=session_id)
        return self.policy.select(candidates, request_info)

    def _with_in_flight(self, replica: Replica) -> Replica:
        """``replica`` carrying this gateway's in-flight count (copied only when it differs:
        this runs for every replica on every request)."""
        in_flight = self._in_flight.get(replica.replica_id, 0)
        return replica if replica.in_flight == in_flight else replace(replica, in_flight=in_flight)

    def _full(self, replica: Replica) -> bool:
        bound = self.max_in_flight_per_replica or replica.capacity()
        return bound > 0 and replica.in_flight >= bound

    @contextmanager
    def track(self, replica: Replica) -> Iterator[None]:
        """Counts a request as in flight on ``replica`` for the duration of the block."""
        self.enter(replica)
        try:
            yield
        finally:
            self.leave(replica)

    def enter(self, replica: Replica) -> None:
        """Counts one more request in flight on ``replica`` (:meth:`track` without the
        context manager, for the engine client's per-request path); :meth:`leave` ends it."""
        self._in_flight[replica.replica_id] = self._in_flight.get(replica.replica_id, 0) + 1

    def leave(self, replica: Replica) -> None:
        remaining = self._in_flight[replica.replica_id] - 1
        if remaining:
            self._in_flight[replica.replica_id] = remaining
        else:
            del self._in_flight[replica.replica_id]
