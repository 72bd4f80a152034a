"""Adapter memory for multi-LoRA: PEFT folders in, device slots out.

Three tiers, like the KV cache's::

    disk / hub     PEFT folder: adapter_config.json + adapter_model.safetensors
      │ load_peft_adapter (validated; fingerprinted)
    host cache     at most ``max_cpu_loras`` adapters' tensors, LRU; a registered adapter
      │            evicted from here is read from its folder again when next needed
    device slots   ``max_loras`` slots of the model's :class:`TorchLoRA` deltas; a slot is
                   pinned while a request using it is unfinished, else reusable (LRU)

A registered name points at one *version* of an adapter (:class:`LoRAAdapter`). Loading a
name again (in place) makes a new version; requests already admitted keep the old one's
slot until they finish. Slots are keyed by version, so two names for identical files still
use separate slots, but share their KV blocks: the prefix-cache key is the version's
*content fingerprint* (a digest of the config fields that change the maths and of every
tensor), never its name or path, so new weights read from an old path never hit stale KV.

In a parallel engine this manager lives on rank 0 alone: it reads, validates and caches
adapters and decides the slots. Every slot write or clear is a :class:`SlotWrite` that its
``slot_listeners`` (the step channels) send on, and every other rank applies it to its own
deltas with :func:`apply_slot_write`, keeping its shard of each pair; so all ranks' slots
hold the same adapters.

Nothing here blocks the step loop: :meth:`LoRAManager.acquire` either returns a slot at once
or ``None`` (every slot is pinned, or the adapter is being read from its folder again on a
worker thread), and the engine keeps such a request aside and asks again.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from engine_service.engine.outputs import LoRAAdapterStats, LoRAStats
from engine_service.layers.linear import LinearBase
from engine_service.layers.lora import LoRASlots, TorchLoRA, attach_lora
from engine_service.models.loader import resolve_model_path
from engine_service.models.weights import resolve_name
from switchyard.block_hash import lora_adapter_key

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Linear layers that never take an adapter: the output head (tied to the embeddings).
_NOT_ADAPTABLE = frozenset({"lm_head"})
_PEFT_PREFIX = "base_model.model."


class UnknownAdapterError(KeyError):
    """A request or an unload named an adapter that is not loaded."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown adapter"


class LoRADisabledError(ValueError):
    """An adapter was asked of an engine started without LoRA."""


@dataclass(slots=True)
class LoRAAdapter:
    """One loaded version of a PEFT adapter.

    ``weights`` maps (our module name, shard id) to the full pair ``(A [r, in], B [out, r])``
    with the scaling already folded into ``B``; it is ``None`` while the adapter is out of
    the host cache. ``fingerprint`` is the content digest that keys its KV blocks.
    """

    name: str
    path: Path
    source: str
    rank: int
    scaling: float
    target_modules: list[str]
    fingerprint: str
    weights: dict[tuple[str, Any], tuple[torch.Tensor, torch.Tensor]] | None = field(
        default=None, repr=False
    )
    requests_total: int = 0

    @property
    def cache_key(self) -> str:
        """What block hashes carry for this adapter (``block_extra_keys``'s adapter key)."""
        return lora_adapter_key(self.fingerprint)


def adaptable_modules(net: nn.Module) -> dict[str, LinearBase]:
    """The model's linear layers that can carry an adapter, by module name."""
    return {
        name: module
        for name, module in net.named_modules()
        if isinstance(module, LinearBase) and name.rsplit(".", 1)[-1] not in _NOT_ADAPTABLE
    }


def checkpoint_target_names(net: nn.Module) -> set[str]:
    """The projection names a PEFT config may target on this model: the checkpoint's own
    (``q_proj``, ``gate_proj``, ...), including the pieces of our stacked layers."""
    ours = {name.rsplit(".", 1)[-1] for name in adaptable_modules(net)}
    mapping = getattr(net, "packed_modules_mapping", {})
    names = {src for src, (dst, _) in mapping.items() if dst in ours}
    stacked = {dst for dst, _ in mapping.values()}
    return names | (ours - stacked)


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"adapter folder {str(path)!r} has no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{CONFIG_FILE} in {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{CONFIG_FILE} in {str(path)!r} is not a JSON object")
    return config


def _check_config(config: dict[str, Any], where: str) -> tuple[int, float, list[str] | str]:
    """(rank, scaling, target_modules) from a PEFT LoRA config; refuses what we cannot run."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"{where}: r must be a positive integer, got {rank!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise ValueError(f"{where}: lora_alpha must be a number, got {alpha!r}")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "bias": config.get("bias", "none") not in (None, "none"),
    }
    if bad := [key for key, used in unsupported.items() if used]:
        raise ValueError(f"{where}: adapters using {', '.join(bad)} are not supported")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        pass
    elif (
        not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets)
    ):
        raise ValueError(f"{where}: target_modules must be a list of module names or a regex")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scaling), targets


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        other = " (only adapter_model.bin, which is not read: save with safetensors)"
        hint = other if (path / "adapter_model.bin").is_file() else ""
        raise ValueError(f"adapter folder {str(path)!r} has no {WEIGHTS_FILE}{hint}")
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{WEIGHTS_FILE} in {str(path)!r} is corrupt: {exc}") from None


def _fingerprint(rank: int, scaling: float, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps({"r": rank, "scaling": scaling}).encode())
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_peft_adapter(name: str, source: str, net: nn.Module, max_rank: int) -> LoRAAdapter:
    """Read and validate the PEFT adapter at ``source`` (a folder or a hub id) for ``net``.

    Raises ``ValueError`` naming the problem: missing or corrupt files, a rank above
    ``max_rank``, target modules the model lacks, tensors that do not fit the model.
    """
    try:
        path = resolve_model_path(source)
    except Exception as exc:  # a missing folder, or any hub failure (unknown id, offline)
        raise ValueError(f"adapter {name!r}: cannot find {source!r}: {exc}") from None
    where = f"adapter {name!r} ({source})"
    rank, scaling, targets = _check_config(_read_config(path), where)
    if rank > max_rank:
        raise ValueError(f"{where}: rank {rank} exceeds --max-lora-rank {max_rank}")
    available = checkpoint_target_names(net)
    if isinstance(targets, list):
        missing = sorted(set(targets) - available)
        if missing:
            raise ValueError(
                f"{where}: target modules {missing} are not adaptable layers of this model "
                f"(it has {sorted(available)})"
            )
    tensors = _read_tensors(path)
    layers = adaptable_modules(net)
    mapping = getattr(net, "packed_modules_mapping", {})
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    pattern = re.compile(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
    for key, tensor in tensors.items():
        match = pattern.fullmatch(key.removeprefix(_PEFT_PREFIX))
        if match is None:
            raise ValueError(f"{where}: unexpected tensor {key!r} in {WEIGHTS_FILE}")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    if not pairs:
        raise ValueError(f"{where}: {WEIGHTS_FILE} holds no LoRA tensors")
    weights: dict[tuple[str, Any], tuple[torch.Tensor, torch.Tensor]] = {}
    used: set[str] = set()
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{where}: {module} has lora_{''.join(pair)} but not its pair")
        ours, shard_id = resolve_name(module + ".weight", mapping)
        ours = ours.removesuffix(".weight")
        layer = layers.get(ours)
        if layer is None:
            raise ValueError(f"{where}: the model has no adaptable layer for {module!r}")
        used.add(module.rsplit(".", 1)[-1])
        a, b = pair["A"], pair["B"]
        if shard_id not in dict(layer.lora_output_slices()):
            raise ValueError(f"{where}: the model has no adaptable layer for {module!r}")
        in_size, out_size = layer.lora_full_sizes(shard_id)
        if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (rank, in_size):
            raise ValueError(
                f"{where}: {module}.lora_A has shape {tuple(a.shape)}, expected ({rank}, {in_size})"
            )
        if tuple(b.shape) != (out_size, rank):
            raise ValueError(
                f"{where}: {module}.lora_B has shape {tuple(b.shape)}, "
                f"expected ({out_size}, {rank})"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"{where}: {module} holds non-finite values")
        weights[(ours, shard_id)] = (a.float(), b.float() * scaling)
    if isinstance(targets, str):
        missing = sorted(used - available)
        if missing:
            raise ValueError(f"{where}: target modules {missing} are not adaptable here")
    return LoRAAdapter(
        name=name,
        path=path,
        source=source,
        rank=rank,
        scaling=scaling,
        target_modules=sorted(used),
        fingerprint=_fingerprint(rank, scaling, tensors),
        weights=weights,
    )


def attach_adapter_slots(
    net: nn.Module, max_loras: int, max_rank: int
) -> tuple[LoRASlots, dict[str, TorchLoRA]]:
    """Give every adaptable layer of ``net`` its ``max_loras`` empty slots: what rank 0's
    :class:`LoRAManager` and every other rank of a parallel engine do alike, so that their
    deltas come in the same order (:class:`SlotWrite` relies on it)."""
    targets = {name.rsplit(".", 1)[-1] for name in adaptable_modules(net)}
    return attach_lora(net, targets, max_loras, max_rank)


@dataclass(frozen=True, slots=True)
class SlotWrite:
    """One device slot's new content, laid out for the wire: what rank 0 writes into its
    own slot and every other rank of a parallel engine repeats (:func:`apply_slot_write`),
    so that all ranks' slots hold the same adapter.

    ``pieces`` has one flag per output piece of every delta, in the deltas' order (a stacked
    qkv layer has three pieces): whether the adapter has a pair there. ``weights`` is those
    pairs' full (unsharded) ``A [rank, in]`` then ``B [out_piece, rank]``, scaling folded
    into ``B``, flattened end to end in the deltas' dtype; each rank keeps its own part
    (:meth:`LinearBase.shard_lora`). No piece set: the slot is cleared.
    """

    slot: int
    rank: int
    pieces: tuple[bool, ...]
    weights: torch.Tensor


def make_slot_write(
    deltas: dict[str, TorchLoRA], slot: int, adapter: LoRAAdapter | None = None
) -> SlotWrite:
    """The write that puts ``adapter`` (with its weights in host memory) into ``slot``, or
    clears ``slot`` (``None``)."""
    like = next(iter(deltas.values())).lora_a_all
    weights = adapter.weights if adapter is not None else None
    pieces: list[bool] = []
    flat: list[torch.Tensor] = []
    for name, delta in deltas.items():
        for shard_id, _ in delta.pieces:
            pair = weights.get((name, shard_id)) if weights is not None else None
            pieces.append(pair is not None)
            if pair is not None:
                flat += [pair[0].reshape(-1), pair[1].reshape(-1)]
    packed = (
        torch.cat(flat).to(device=like.device, dtype=like.dtype)
        if flat
        else torch.empty(0, dtype=like.dtype, device=like.device)
    )
    rank = adapter.rank if adapter is not None and flat else 0
    return SlotWrite(slot, rank, tuple(pieces), packed)


def apply_slot_write(deltas: dict[str, TorchLoRA], write: SlotWrite) -> None:
    """Write (or clear) one slot of every delta from ``write``; each layer keeps this
    rank's part of each pair."""
    flags = iter(write.pieces)
    offset, rank = 0, write.rank
    for delta in deltas.values():
        delta.clear_adapter(write.slot)
        for shard_id, _ in delta.pieces:
            if not next(flags):
                continue
            in_size, out_size = delta.layer.lora_full_sizes(shard_id)
            a = write.weights[offset : offset + rank * in_size].view(rank, in_size)
            offset += rank * in_size
            b = write.weights[offset : offset + out_size * rank].view(out_size, rank)
            offset += out_size * rank
            delta.set_adapter(write.slot, shard_id, a, b, 1.0)
    if offset != write.weights.numel() or next(flags, None) is not None:
        raise ValueError("a LoRA slot write does not fit this model's adapter layers")


@dataclass(slots=True)
class _Slot:
    adapter: LoRAAdapter | None = None
    users: int = 0


class LoRAManager:
    """Registered adapters, their host cache and the model's device slots.

    Contract: :meth:`acquire` pins a slot for one request (ids ``0 .. max_loras - 1``) and
    :meth:`release` unpins it; a slot is only ever rewritten while unpinned, so the weights
    a running request reads never change under it.
    """

    def __init__(
        self, net: nn.Module, max_loras: int, max_rank: int, max_cpu_loras: int | None = None
    ) -> None:
        if max_loras <= 0:
            raise ValueError("max_loras must be positive")
        if max_rank <= 0:
            raise ValueError("max_lora_rank must be positive")
        max_cpu_loras = max_loras if max_cpu_loras is None else max_cpu_loras
        if max_cpu_loras < max_loras:
            raise ValueError(
                f"max_cpu_loras ({max_cpu_loras}) must be at least max_loras ({max_loras})"
            )
        self.net = net
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.max_cpu_loras = max_cpu_loras
        self.slots: LoRASlots
        self.deltas: dict[str, TorchLoRA]
        self.slots, self.deltas = attach_adapter_slots(net, max_loras, max_rank)
        # Called with every slot write and clear, after this process's own: a parallel
        # engine's channel, which repeats it on the other ranks.
        self.slot_listeners: list[Callable[[SlotWrite], None]] = []
        self.adapters: dict[str, LoRAAdapter] = {}
        self._slots = [_Slot() for _ in range(max_loras)]
        self._host: OrderedDict[str, LoRAAdapter] = OrderedDict()  # fingerprint -> version
        self._slot_lru: OrderedDict[int, None] = OrderedDict((i, None) for i in range(max_loras))
        self.loads_total = 0
        self.load_seconds_total = 0.0
        # Re-reads of adapters evicted from the host cache, by id of the version.
        self._reader: ThreadPoolExecutor | None = None
        self._reads: dict[int, Future[LoRAAdapter]] = {}

    # -- registry -------------------------------------------------------------------------

    def add(self, name: str, source: str, replace: bool = False) -> LoRAAdapter:
        """Load, validate and register ``name``; ``replace`` reloads an existing name in
        place. Raises ``ValueError`` and changes nothing when the adapter is bad."""
        self.check_name(name, replace)
        return self.register(self.read(name, source), replace)

    def check_name(self, name: str, replace: bool = False) -> None:
        if not name:
            raise ValueError("an adapter needs a name")
        if name in self.adapters and not replace:
            raise FileExistsError(f"adapter {name!r} is already loaded")

    def read(self, name: str, source: str) -> LoRAAdapter:
        """Read and validate an adapter without touching any state of the manager (so it
        may run on another thread than the engine's)."""
        return load_peft_adapter(name, source, self.net, self.max_rank)

    def register(self, adapter: LoRAAdapter, replace: bool = False) -> LoRAAdapter:
        """Make ``adapter`` (from :meth:`read`) the version its name serves."""
        self.check_name(adapter.name, replace)
        previous = self.adapters.get(adapter.name)
        self.adapters[adapter.name] = adapter
        if previous is not None:
            for index, slot in enumerate(self._slots):
                if slot.adapter is previous and slot.users == 0:
                    self._clear(index)
        self._cache(adapter)
        return adapter

    def remove(self, name: str) -> None:
        """Unregister ``name``; requests already admitted with it finish with it."""
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        for index, slot in enumerate(self._slots):
            if slot.adapter is adapter and slot.users == 0:
                self._clear(index)
        self._host.pop(adapter.fingerprint, None)

    def get(self, name: str) -> LoRAAdapter:
        adapter = self.adapters.get(name)
        if adapter is None:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        return adapter

    def stats(self, running: list[str], waiting: list[str]) -> LoRAStats:
        held = {id(s.adapter) for s in self._slots if s.adapter is not None}
        return LoRAStats(
            max_loras=self.max_loras,
            adapters=tuple(
                LoRAAdapterStats(
                    name=a.name,
                    path=a.source,
                    fingerprint=a.fingerprint,
                    resident=id(a) in held,
                    requests_total=a.requests_total,
                )
                for a in self.adapters.values()
            ),
            running=tuple(sorted(set(running))),
            waiting=tuple(sorted(set(waiting))),
            loads_total=self.loads_total,
            load_seconds_total=self.load_seconds_total,
        )

    def resident(self) -> list[str]:
        """Names whose current version sits in a device slot."""
        held = {id(s.adapter) for s in self._slots if s.adapter is not None}
        return sorted(name for name, a in self.adapters.items() if id(a) in held)

    # -- slots ----------------------------------------------------------------------------

    def acquire(self, adapter: LoRAAdapter) -> int | None:
        """Pin a slot holding ``adapter`` (loading it into the least recently used free
        slot if needed); ``None`` when every slot is pinned by other adapters, or while the
        adapter, evicted from the host cache, is read from its folder again on a worker
        thread (ask again later; :meth:`wait_for_reads` waits for it). Raises
        ``ValueError`` when that read fails or finds other weights than were loaded."""
        for index, slot in enumerate(self._slots):
            if slot.adapter is adapter:
                slot.users += 1
                self._slot_lru.move_to_end(index)
                return index
        free = next((i for i in self._slot_lru if self._slots[i].users == 0), None)
        if free is None:
            return None
        if adapter.weights is None and not self._finish_read(adapter):
            return None
        self._write(free, adapter)
        self._slots[free].users = 1
        self._slot_lru.move_to_end(free)
        return free

    def release(self, index: int) -> None:
        slot = self._slots[index]
        if slot.users <= 0:
            raise RuntimeError(f"LoRA slot {index} released more often than acquired")
        slot.users -= 1
        stale = (
            slot.adapter is not None and self.adapters.get(slot.adapter.name) is not slot.adapter
        )
        if slot.users == 0 and stale:
            self._clear(index)  # unloaded or replaced meanwhile: nobody can ask for it again

    def _write(self, index: int, adapter: LoRAAdapter) -> None:
        started = time.perf_counter()
        self._cache(adapter)
        assert adapter.weights is not None
        self._apply(make_slot_write(self.deltas, index, adapter))
        self._slots[index].adapter = adapter
        self.loads_total += 1
        self.load_seconds_total += time.perf_counter() - started

    def _clear(self, index: int) -> None:
        self._apply(make_slot_write(self.deltas, index))
        self._slots[index].adapter = None

    def _apply(self, write: SlotWrite) -> None:
        apply_slot_write(self.deltas, write)
        for listener in self.slot_listeners:
            listener(write)

    def _finish_read(self, adapter: LoRAAdapter) -> bool:
        """Whether the re-read of an evicted adapter is done (its weights set); starts it
        on the reader thread the first time."""
        read = self._reads.get(id(adapter))
        if read is None:
            if self._reader is None:
                self._reader = ThreadPoolExecutor(1, thread_name_prefix="lora-read")
            self._reads[id(adapter)] = self._reader.submit(
                load_peft_adapter, adapter.name, adapter.source, self.net, self.max_rank
            )
            return False
        if not read.done():
            return False
        del self._reads[id(adapter)]
        fresh = read.result()  # a failed read raises its ValueError here
        if fresh.fingerprint != adapter.fingerprint:
            raise ValueError(
                f"adapter {adapter.name!r} changed on disk since it was loaded; "
                "load it again (load_inplace) to serve the new weights"
            )
        adapter.weights = fresh.weights
        return True

    @property
    def reads_in_flight(self) -> bool:
        return bool(self._reads)

    def wait_for_reads(self, timeout_s: float) -> None:
        """Block until a re-read finishes or ``timeout_s`` passes."""
        if self._reads:
            wait(list(self._reads.values()), timeout_s, return_when=FIRST_COMPLETED)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)

    def _cache(self, adapter: LoRAAdapter) -> None:
        self._host[adapter.fingerprint] = adapter
        self._host.move_to_end(adapter.fingerprint)
        while len(self._host) > self.max_cpu_loras:
            _, evicted = self._host.popitem(last=False)
            evicted.weights = None
