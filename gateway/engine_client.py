"""Running a request on an engine replica over gRPC, with failover before the first response.

One channel per replica address, reused by every request; a channel whose replica left the
routing table is closed once no request uses it. Channels reconnect quickly (within about a
second of an engine listening again) rather than with gRPC's default backoff of up to minutes.

A request that fails on a replica before any response arrives (the replica is down, refuses,
or is out of room) is retried on another replica. A replica that was unreachable is also
marked so (:meth:`Router.mark_unreachable`), so that other requests avoid it at once. When
every replica has been tried and the last failure was UNAVAILABLE, the request waits up to
``failover_wait_s`` for a replica to become routable again (the crashed engine's restart, or
a new replica) and tries that; only then does it fail. A request is tried at most
:data:`MAX_ATTEMPTS` times in all, so that one that itself brings engines down (a query of
death) cannot take the fleet down over and over. Once a response has arrived, the client
may have seen output and a failure ends the request with an error instead. Leaving the
iteration early, for any reason (a stop string, a client that went away), cancels the call,
which aborts the request on the engine and frees its KV blocks.

Prefill/decode disaggregation: when prefill replicas are routable, a request of one sample,
without a LoRA adapter, whose prompt has at least ``pd_min_prompt_tokens`` tokens runs on a
decode replica with ``prefill_address`` naming a prefill replica (see
:meth:`Router.select_prefill`); the decode replica fetches the prompt's KV from it, and
computes the prompt itself should that fail. Failover is the decode replica's: a retry picks
both replicas again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc
from prometheus_client import Counter

from gateway.routing import NoReplicaAvailable, Replica, RequestInfo, Router
from switchyard.grpc_utils import CHANNEL_OPTIONS
from switchyard.v1 import engine_pb2, engine_pb2_grpc

logger = logging.getLogger(__name__)

# Failures that say "not here, not now" rather than "this request is wrong".
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# A replica that went away comes back (restarted) on the same address: reconnect promptly.
_ENGINE_CHANNEL_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
# Tries of one request, the first included.
MAX_ATTEMPTS = 5
# How often a request waiting for failover looks for a routable replica.
_FAILOVER_POLL_S = 0.1


class EngineError(Exception):
    """An engine ended a request with a gRPC error (after retries, where they applied)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class EngineClient:
    """Streams ``Generate`` calls to replicas the router selects."""

    def __init__(
        self,
        router: Router,
        retries: Counter,
        *,
        timeout_s: float | None = None,
        failover_wait_s: float = 0.0,
        pd_min_prompt_tokens: int = 0,
    ) -> None:
        self._router = router
        self._pd_min_prompt_tokens = pd_min_prompt_tokens
        self._retries = retries
        self._timeout_s = timeout_s
        self._failover_wait_s = failover_wait_s
        self._stubs: dict[str, engine_pb2_grpc.EngineServiceStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._calls_by_address: dict[str, int] = {}
        # The routing table every open channel is listed in (nothing to close until it changes).
        self._table_checked: object = None

    def channel_addresses(self) -> set[str]:
        """The replica addresses this client holds an open channel to."""
        return set(self._channels)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()

    def _stub(self, address: str) -> engine_pb2_grpc.EngineServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address, options=_ENGINE_CHANNEL_OPTIONS)
            self._channels[address] = channel
            stub = self._stubs[address] = engine_pb2_grpc.EngineServiceStub(channel)
        return stub

    async def _close_departed(self) -> None:
        """Closes the idle channels of replicas that are no longer in the routing table, so
        that a fleet that churns through replicas does not leave sockets behind."""
        table = self._router.source.replicas()
        if table is self._table_checked:
            return  # the same table (sources replace it whole), and nothing left to close
        listed = {replica.address for replica in table}
        departed = [
            address
            for address in self._channels
            if address not in listed and not self._calls_by_address.get(address)
        ]
        for address in departed:
            channel = self._channels.pop(address)
            del self._stubs[address]
            await channel.close()
        # Channels still busy are looked at again on the next request; new channels only
        # open to listed replicas.
        if all(address in listed for address in self._channels):
            self._table_checked = table

    async def _select(
        self,
        request_info: RequestInfo,
        tried: set[str],
        last_error: grpc.aio.AioRpcError | None,
        wait_until: float | None,
        disaggregated: bool = False,
    ) -> Replica:
        """The next replica to try: an untried one; else, once an attempt failed UNAVAILABLE
        and until ``wait_until``, any routable one as soon as there is one. Failing that, the
        error to report is ``last_error`` (RESOURCE_EXHAUSTED when any replica was full)."""
        try:
            return self._router.select(
                request_info, exclude=frozenset(tried), disaggregated=disaggregated
            )
        except NoReplicaAvailable:
            if last_error is None:
                raise
        while wait_until is not None and time.monotonic() < wait_until:
            await asyncio.sleep(_FAILOVER_POLL_S)
            if self._router.ready_replicas():
                # Marks have lapsed or a replica (re)joined: try again from scratch.
                tried.clear()
                return self._router.select(request_info, disaggregated=disaggregated)
        raise EngineError(last_error.code(), _failure_message(last_error)) from None

    def _disaggregates(self, request: engine_pb2.GenerateRequest) -> bool:
        """Whether a prefill replica should compute the request's prompt: one sample, no
        LoRA adapter, no images, and a prompt of at least ``pd_min_prompt_tokens``."""
        return (
            request.sampling.n <= 1
            and not request.adapter
            and not request.images
            and len(request.prompt_token_ids) >= self._pd_min_prompt_tokens
        )

    async def generate(
        self,
        request: engine_pb2.GenerateRequest,
        request_info: RequestInfo,
        *,
        on_sent: Callable[[], object] | None = None,
    ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        """Yields the engine's responses; raises ``EngineError`` or ``NoReplicaAvailable``.

        ``on_sent`` is called once, on the event loop, right after the first attempt's
        request has gone out: what the caller needs only once the first response is in can
        be prepared there, while the engine computes, instead of after it.

        Close the iterator (``contextlib.aclosing``) to cancel the call early.
        """
        tried: set[str] = set()
        last_error: grpc.aio.AioRpcError | None = None
        wait_until: float | None = None
        router = self._router
        for attempt in range(1, MAX_ATTEMPTS + 1):
            if router.source.replicas() is not self._table_checked:
                await self._close_departed()
            disaggregated = self._disaggregates(request) and router.has_prefill_replicas()
            if last_error is None:  # the first try: every later one follows a failure
                replica = router.select(
                    request_info, exclude=frozenset(tried), disaggregated=disaggregated
                )
            else:
                replica = await self._select(
                    request_info, tried, last_error, wait_until, disaggregated
                )
            tried.add(replica.replica_id)
            prefill = None
            if disaggregated and not replica.is_prefill:
                prefill = router.select_prefill(request_info, replica)
            sent = request
            if prefill is not None:
                sent = engine_pb2.GenerateRequest()
                sent.CopyFrom(request)
                sent.prefill_address = prefill.address
            started = False
            address = replica.address
            call = self._stub(address).Generate(sent, timeout=self._timeout_s)
            if on_sent is not None:
                # grpc.aio queued the call's send as a step of its own when it made the call;
                # a callback queued now runs after it, while this task waits for a response.
                asyncio.get_running_loop().call_soon(on_sent)
                on_sent = None
            self._calls_by_address[address] = self._calls_by_address.get(address, 0) + 1
            # Router.track for both replicas, without two context managers per request.
            router.enter(replica)
            if prefill is not None:
                router.enter(prefill)
            # The call's own response iterator, closed below: left suspended (the samples
            # finished before the stream's end), the event loop would close it in a task of
            # its own once it is dropped, one more task per request.
            responses = call.__aiter__()
            try:
                async for response in responses:
                    if not started:
                        started = True
                        router.mark_reachable(replica)
                    yield response
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    router.mark_unreachable(replica)
                if started or exc.code() not in _RETRYABLE or attempt == MAX_ATTEMPTS:
                    raise EngineError(exc.code(), _failure_message(exc)) from None
                # A full queue anywhere says "busy, retry soon" rather than "down".
                if last_error is None or exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    last_error = exc
                if exc.code() == grpc.StatusCode.UNAVAILABLE and wait_until is None:
                    wait_until = time.monotonic() + self._failover_wait_s
                self._retries.inc()
                logger.warning(
                    "engine failed before the first response; retrying",
                    extra={"replica": replica.replica_id, "code": exc.code().name},
                )
            finally:
                call.cancel()
                await responses.aclose()
                if prefill is not None:
                    router.leave(prefill)
                router.leave(replica)
                remaining = self._calls_by_address[address] - 1
                if remaining:
                    self._calls_by_address[address] = remaining
                else:
                    del self._calls_by_address[address]


def _failure_message(exc: grpc.aio.AioRpcError) -> str:
    """What the client is told: the engine's own words, except for a lost connection, whose
    details name internal addresses."""
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return "the engine replica serving the request is unavailable"
    return exc.details() or exc.code().name.lower()
