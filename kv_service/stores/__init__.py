"""Block stores behind one interface (:class:`KVStore`), and :func:`open_store`, which builds
the one a ``--kv-store`` spec names."""

from __future__ import annotations

from pathlib import Path

from kv_service.stores.base import KVStore, TierStats
from kv_service.stores.disk import DiskStore
from kv_service.stores.memory import MemoryStore
from kv_service.stores.redis_store import RedisStore
from kv_service.stores.tiered import TieredStore

__all__ = [
    "DiskStore",
    "KVStore",
    "MemoryStore",
    "RedisStore",
    "TierStats",
    "TieredStore",
    "open_store",
]


def open_store(
    spec: str,
    *,
    memory_bytes: int,
    disk_bytes: int,
    redis_ttl_s: float,
    default_disk_dir: Path,
) -> KVStore:
    """The store ``spec`` names:

    - ``memory``: a memory store of ``memory_bytes``;
    - ``disk`` or ``disk:PATH``: a disk store of ``disk_bytes`` under PATH (default
      ``default_disk_dir``);
    - ``redis://HOST:PORT[/DB]``: Redis, blocks expiring ``redis_ttl_s`` after they were
      written (0: never).

    Disk and Redis get a memory tier of ``memory_bytes`` on top unless it is 0. Raises
    ``ValueError`` for any other spec.
    """
    lower: KVStore
    if spec == "memory":
        return MemoryStore(memory_bytes)
    if spec == "disk" or spec.startswith("disk:"):
        path = spec.removeprefix("disk").removeprefix(":")
        lower = DiskStore(Path(path).expanduser() if path else default_disk_dir, disk_bytes)
    elif spec.startswith("redis://"):
        lower = RedisStore(spec, ttl_s=redis_ttl_s)
    else:
        raise ValueError(f"unknown KV store {spec!r}: use memory, disk[:PATH] or redis://HOST:PORT")
    return TieredStore(MemoryStore(memory_bytes), lower) if memory_bytes > 0 else lower
