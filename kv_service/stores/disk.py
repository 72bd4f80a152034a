"""The disk tier: one file per block under a folder, bounded in bytes, evicted LRU.

Layout::

    root/
      tmp/<random>.tmp              records being written; removed on start
      <h0h1>/<fingerprint><hash>.blk  one record (see ``stores.base``); h0h1 = hash's first byte

A write goes to ``tmp/``, is fsynced, then renamed over its final name, so a reader sees the
whole record or none; a crash leaves at worst a temp file (deleted on the next start) or a
missing block (a miss). The directory is not fsynced: losing a rename in a crash only loses a
block, and a block is a cache entry. Recency is the file's mtime, bumped on every read, so
the LRU order survives a restart; on start the folder is re-indexed from the file names and
sizes. Reads check the whole record (length and checksum) and delete one that fails.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

from kv_service.keys import BLOCK_HASH_BYTES, FINGERPRINT_BYTES, Block, BlockKey
from kv_service.stores.base import CorruptRecord, KVStore, TierStats, decode_record, encode_record

logger = logging.getLogger(__name__)

_RAW_KEY_BYTES = FINGERPRINT_BYTES + BLOCK_HASH_BYTES
_WRITE_SLICE = 1 << 20


class DiskStore(KVStore):
    """Blocks as files under ``root``, at most ``capacity_bytes`` of records in all.

    Bytes of writes in flight are reserved up front, so concurrent writers never take the
    folder past its bound. A write that fails (``ENOSPC``, ``EIO``, ...) is refused: its temp
    file is removed, its reservation released, and the blocks already stored are untouched.
    """

    def __init__(self, root: Path, capacity_bytes: int) -> None:
        self.root = root
        self.capacity_bytes = capacity_bytes
        self._tmp_dir = root / "tmp"
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        self._index: OrderedDict[bytes, int] = OrderedDict()  # raw key -> record bytes, LRU first
        self._used_bytes = 0  # stored records plus reservations of writes in flight
        self._lock = threading.Lock()
        self._stats = TierStats("disk", capacity_bytes=capacity_bytes)
        self._writes_failing = False
        self._reindex()

    @property
    def spec(self) -> str:
        return f"disk:{self.root}"

    def _path(self, key: BlockKey) -> Path:
        return self.root / key.block_hash[:1].hex() / f"{key.hex}.blk"

    def _reindex(self) -> None:
        for leftover in self._tmp_dir.iterdir():
            with suppress(OSError):
                leftover.unlink()
        found: list[tuple[int, bytes, int]] = []
        for path in self.root.glob("??/*.blk"):
            try:
                raw = bytes.fromhex(path.stem)
                stat = path.stat()
            except (ValueError, OSError):
                continue
            if len(raw) == _RAW_KEY_BYTES:
                found.append((stat.st_mtime_ns, raw, stat.st_size))
        for _, raw, size in sorted(found):
            self._index[raw] = size
            self._used_bytes += size
        with self._lock:
            self._evict_until_fits(0)
        logger.info(
            "disk store indexed",
            extra={"root": str(self.root), "blocks": len(self._index), "bytes": self._used_bytes},
        )

    def _evict_until_fits(self, incoming: int) -> bool:
        """Evicts LRU blocks until ``incoming`` more bytes fit; the caller holds the lock."""
        while self._used_bytes + incoming > self.capacity_bytes and self._index:
            raw, size = self._index.popitem(last=False)
            self._used_bytes -= size
            self._stats.evictions += 1
            key = BlockKey(raw[:FINGERPRINT_BYTES], raw[FINGERPRINT_BYTES:])
            with suppress(FileNotFoundError):
                self._path(key).unlink()
        return self._used_bytes + incoming <= self.capacity_bytes

    def put_many(self, blocks: Sequence[Block]) -> list[bool]:
        return [self._put(block) for block in blocks]

    def _put(self, block: Block) -> bool:
        record = encode_record(block)
        size = len(record)
        raw = block.key.raw
        path = self._path(block.key)
        with self._lock:
            if raw in self._index:
                self._index.move_to_end(raw)
                present = True
            elif size > self.capacity_bytes or not self._evict_until_fits(size):
                self._stats.refused_writes += 1
                return False
            else:
                present = False
                self._used_bytes += size
        if present:
            with suppress(OSError):
                os.utime(path)
            return True
        tmp_path = self._tmp_dir / f"{uuid.uuid4().hex}.tmp"
        try:
            _write_synced(tmp_path, record)
            path.parent.mkdir(exist_ok=True)
            os.replace(tmp_path, path)
        except OSError as exc:
            with suppress(OSError):
                tmp_path.unlink()
            with self._lock:
                self._used_bytes -= size
                self._stats.refused_writes += 1
                self._stats.errors += 1
                first_failure = not self._writes_failing
                self._writes_failing = True
            if first_failure:
                logger.warning("disk store refuses writes: %s", exc, extra={"root": str(self.root)})
            return False
        with self._lock:
            if raw in self._index:  # a concurrent put of the same key won the race
                self._used_bytes -= size
            else:
                self._index[raw] = size
            self._stats.bytes_written += size
            recovered = self._writes_failing
            self._writes_failing = False
        if recovered:
            logger.info("disk store writes succeed again", extra={"root": str(self.root)})
        return True

    def get_many(self, keys: Sequence[BlockKey]) -> list[Block | None]:
        return [self._get(key) for key in keys]

    def _get(self, key: BlockKey) -> Block | None:
        raw = key.raw
        with self._lock:
            if raw not in self._index:
                self._stats.misses += 1
                return None
            self._index.move_to_end(raw)
        path = self._path(key)
        try:
            record = path.read_bytes()
            block = decode_record(key, record)
        except FileNotFoundError:
            self._forget(raw)
            return self._miss()
        except CorruptRecord as exc:
            logger.warning("corrupt block deleted: %s", exc, extra={"path": str(path)})
            self._forget(raw)
            with suppress(FileNotFoundError):
                path.unlink()
            with self._lock:
                self._stats.corrupt_blocks += 1
            return self._miss()
        except OSError as exc:
            logger.warning("disk read failed: %s", exc, extra={"path": str(path)})
            with self._lock:
                self._stats.errors += 1
            return self._miss()
        with suppress(OSError):
            os.utime(path)
        with self._lock:
            self._stats.hits += 1
            self._stats.bytes_read += len(record)
        return block

    def _miss(self) -> None:
        with self._lock:
            self._stats.misses += 1

    def _forget(self, raw: bytes) -> bool:
        with self._lock:
            size = self._index.pop(raw, None)
            if size is None:
                return False
            self._used_bytes -= size
            return True

    def lookup(self, keys: Sequence[BlockKey]) -> int:
        with self._lock:
            for count, key in enumerate(keys):
                if key.raw not in self._index:
                    return count
        return len(keys)

    def delete_many(self, keys: Sequence[BlockKey]) -> int:
        deleted = 0
        for key in keys:
            if self._forget(key.raw):
                deleted += 1
                with suppress(FileNotFoundError):
                    self._path(key).unlink()
        return deleted

    def stats(self) -> list[TierStats]:
        with self._lock:
            return [
                dataclasses.replace(
                    self._stats, blocks=len(self._index), bytes_used=self._used_bytes
                )
            ]


def _write_synced(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` and fsync it; raises ``OSError`` (the file may remain)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view[:_WRITE_SLICE])
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
