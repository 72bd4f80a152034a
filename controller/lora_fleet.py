"""The controller's LoRA side: adapters loaded and unloaded at runtime across the fleet,
the same adapters for replicas that join later, observed demand, and the placement.

``load`` tries the first READY LoRA replica alone: a bad adapter fails there, with the
engine's status and reason, and no other replica is touched. Then the rest load it too,
and the adapter is remembered, so that a replica registering later (a restart, a scale-up)
gets it as well. ``unload`` removes it everywhere and forgets it. Each replica's adapters
go into the registry at once, ahead of its next heartbeat, so gateways see the change in
their next routing table.

Demand is the requests per adapter between heartbeats (``requests_total`` increments),
decayed by half at every replan; the placement (:mod:`controller.lora_placement`) is
computed again from it whenever a replica registers, beats or leaves.

With a ``state_file`` the runtime adapters outlive the controller: every load and unload
rewrites the file (atomically), and a controller that starts reads it back, so replicas that
register with it (the engines that outlived it, restarts, scale-ups) catch up on them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import grpc
from google.protobuf import json_format

from controller.lora_placement import ReplicaSlots, plan_lora_placement
from controller.registry import ReplicaRegistry
from switchyard.grpc_utils import insecure_channel
from switchyard.v1 import common_pb2, engine_pb2, engine_pb2_grpc

log = logging.getLogger(__name__)

ENGINE_RPC_TIMEOUT_S = 300.0  # a hub download may be slow
DEMAND_DECAY = 0.5


class FleetError(Exception):
    """A load or unload failed; ``code`` and ``details`` are what the caller answers."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class LoRAFleet:
    def __init__(self, registry: ReplicaRegistry, state_file: Path | None = None) -> None:
        self._registry = registry
        self._state_file = state_file
        self._runtime: dict[str, engine_pb2.LoadLoRAAdapterRequest] = self._read_state()
        self._demand: dict[str, float] = {}
        self._seen_totals: dict[tuple[str, str], int] = {}
        self._placement: dict[str, frozenset[str]] = {}

    @property
    def runtime_adapters(self) -> list[str]:
        """Names of the adapters loaded at runtime (and remembered), in load order."""
        return list(self._runtime)

    def _read_state(self) -> dict[str, engine_pb2.LoadLoRAAdapterRequest]:
        if self._state_file is None or not self._state_file.exists():
            return {}
        try:
            entries = json.loads(self._state_file.read_text())
            requests = [
                json_format.ParseDict(entry, engine_pb2.LoadLoRAAdapterRequest())
                for entry in entries
            ]
        except (OSError, ValueError, json_format.ParseError) as exc:
            log.warning(
                "ignoring an unreadable LoRA state file",
                extra={"path": str(self._state_file), "error": str(exc)},
            )
            return {}
        if requests:
            log.info(
                "runtime LoRA adapters restored",
                extra={"adapters": [r.lora_name for r in requests]},
            )
        return {r.lora_name: r for r in requests}

    def _write_state(self) -> None:
        if self._state_file is None:
            return
        entries = [json_format.MessageToDict(r) for r in self._runtime.values()]
        self._state_file.parent.mkdir(parents=True, exist_ok=True)
        partial = self._state_file.with_suffix(".tmp")
        partial.write_text(json.dumps(entries, indent=2))
        os.replace(partial, self._state_file)

    # -- runtime loads --------------------------------------------------------------------

    def _lora_replicas(self) -> list[common_pb2.Replica]:
        return [
            r
            for r in self._registry.replicas()
            if r.state == common_pb2.REPLICA_STATE_READY and r.max_loras > 0
        ]

    async def load(self, request: engine_pb2.LoadLoRAAdapterRequest) -> None:
        replicas = self._lora_replicas()
        if not replicas:
            raise FleetError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "no ready replica serves LoRA adapters (start engines with --enable-lora)",
            )
        first, *rest = replicas
        await self._load_on(first, request)  # a bad adapter stops here
        results = await asyncio.gather(
            *(self._load_on(r, request) for r in rest), return_exceptions=True
        )
        for replica, result in zip(rest, results):
            if isinstance(result, Exception):
                log.warning(
                    "LoRA load failed on a replica",
                    extra={"replica_id": replica.replica_id, "error": str(result)},
                )
        self._runtime[request.lora_name] = request
        self._write_state()
        self.replan()

    async def unload(self, request: engine_pb2.UnloadLoRAAdapterRequest) -> None:
        name = request.lora_name
        holders = [r for r in self._lora_replicas() if any(a.name == name for a in r.lora_adapters)]
        if not holders and name not in self._runtime:
            raise FleetError(grpc.StatusCode.NOT_FOUND, f"adapter {name!r} is not loaded")
        if self._runtime.pop(name, None) is not None:
            self._write_state()
        for replica in holders:
            try:
                await _call(
                    replica.address,
                    lambda stub: stub.UnloadLoRAAdapter(request, timeout=ENGINE_RPC_TIMEOUT_S),
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise FleetError(exc.code(), exc.details() or exc.code().name) from None
            kept = [a for a in replica.lora_adapters if a.name != name]
            self._registry.set_lora_adapters(replica.replica_id, kept)
        self.replan()

    async def catch_up(self, replica_id: str) -> None:
        """Load every runtime adapter the replica lacks (it registered after the load)."""
        replica = self._registry.get(replica_id)
        if replica is None or replica.max_loras == 0:
            return
        held = {a.name: a for a in replica.lora_adapters}
        for name, request in list(self._runtime.items()):
            if name in held and held[name].path == request.lora_path:
                continue
            replace = engine_pb2.LoadLoRAAdapterRequest()
            replace.CopyFrom(request)
            replace.load_inplace = name in held
            try:
                await self._load_on(replica, replace)
            except FleetError as exc:
                log.warning(
                    "LoRA catch-up load failed",
                    extra={"replica_id": replica_id, "lora_name": name, "error": exc.details},
                )

    async def _load_on(
        self, replica: common_pb2.Replica, request: engine_pb2.LoadLoRAAdapterRequest
    ) -> None:
        try:
            reply = await _call(
                replica.address,
                lambda stub: stub.LoadLoRAAdapter(request, timeout=ENGINE_RPC_TIMEOUT_S),
            )
        except grpc.aio.AioRpcError as exc:
            raise FleetError(exc.code(), exc.details() or exc.code().name) from None
        current = self._registry.get(replica.replica_id)
        if current is not None:
            kept = [a for a in current.lora_adapters if a.name != request.lora_name]
            self._registry.set_lora_adapters(replica.replica_id, [*kept, reply.adapter])

    # -- demand and placement -------------------------------------------------------------

    def observe(self, replica_id: str, adapters: list[common_pb2.LoRAAdapterInfo]) -> None:
        """Count the requests each adapter got on ``replica_id`` since its last report."""
        for adapter in adapters:
            key = (replica_id, adapter.name)
            before = self._seen_totals.get(key, 0)
            grown = adapter.requests_total - before if adapter.requests_total >= before else 0
            self._seen_totals[key] = adapter.requests_total
            self._demand[adapter.name] = self._demand.get(adapter.name, 0.0) + grown

    def replan(self) -> None:
        replicas = self._lora_replicas()
        slots = [
            ReplicaSlots(r.replica_id, r.max_loras, frozenset(a.name for a in r.lora_adapters))
            for r in replicas
        ]
        names = {name for s in slots for name in s.registered}
        demand = {name: self._demand.get(name, 0.0) for name in names}
        plan = plan_lora_placement(demand, slots, self._placement)
        self._placement = {replica_id: frozenset(v) for replica_id, v in plan.items()}
        self._registry.set_placement(plan)
        self._demand = {name: value * DEMAND_DECAY for name, value in demand.items()}


async def _call(address: str, rpc) -> engine_pb2.LoadLoRAAdapterResponse:  # type: ignore[no-untyped-def]
    async with insecure_channel(address) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        return await rpc(stub)
