"""Engines sharing the real KV service: cross-replica reuse, restarts, corruption, outages."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine_service.engine import EngineConfig, LLMEngine
from engine_service.engine.offload import RemoteUnavailable
from engine_service.kv_connector import KVServiceStore
from kv_service.server import KVServer
from switchyard.settings import KVServiceSettings
from tests.engine_service.helpers import greedy, make_engine, make_llama_checkpoint

rng = random.Random(11)
SYSTEM = [rng.randrange(3, 300) for _ in range(40)]
PROMPT_A = [*SYSTEM, 17, 18, 19, 20, 21]
PROMPT_B = [*SYSTEM, 40, 41, 42, 43, 44, 45]
SYSTEM_BLOCKS = len(SYSTEM) // 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cross-replica-ckpt")
    make_llama_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def expected(checkpoint: Path) -> dict[str, list[int]]:
    engine = make_engine(checkpoint)
    return {
        "a": engine.generate([PROMPT_A], greedy(8))[0][0],
        "b": engine.generate([PROMPT_B], greedy(8))[0][0],
    }


class KVServiceThread:
    """The KV service on an event loop of its own thread, so engines can call it blocking."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.server: KVServer | None = None

    def start(self, store: str, port: int, data_dir: Path) -> None:
        settings = KVServiceSettings(
            host="127.0.0.1",
            port=port,
            metrics_port=0,
            kv_store=store,
            kv_memory_bytes=0 if store.startswith("disk") else 64 << 20,
            data_dir=data_dir,
        )
        self.server = KVServer(settings)
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result()

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(0), self._loop).result()
            self.server = None

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()


@pytest.fixture
def kv_service() -> Iterator[KVServiceThread]:
    service = KVServiceThread()
    yield service
    service.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def remote_engine(checkpoint: Path, port: int, **config: object) -> LLMEngine:
    settings = {
        "num_kv_blocks": 64,
        "block_size": 4,
        "enable_kv_offload": True,
        "kv_offload_host_bytes": 1 << 20,
        **config,
    }
    engine_config = EngineConfig(model=str(checkpoint), dtype="float32", **settings)  # type: ignore[arg-type]
    return LLMEngine(engine_config, KVServiceStore(f"127.0.0.1:{port}", timeout_s=1.0))


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_replica_b_skips_the_prefill_replica_a_computed(checkpoint, expected, kv_service, tmp_path):
    port = free_port()
    kv_service.start("memory", port, tmp_path)
    replica_a, replica_b = remote_engine(checkpoint, port), remote_engine(checkpoint, port)
    try:
        assert replica_a.generate([PROMPT_A], greedy(8))[0][0] == expected["a"]
        wait_for(lambda: replica_a.stats().remote_put_blocks >= SYSTEM_BLOCKS)

        assert replica_b.generate([PROMPT_B], greedy(8))[0][0] == expected["b"]
        stats = replica_b.stats()
        assert stats.remote_hit_tokens == len(SYSTEM)
        assert stats.restored_blocks_remote == SYSTEM_BLOCKS
        assert stats.recomputed_tokens == len(PROMPT_B) - len(SYSTEM)
    finally:
        replica_a.close()
        replica_b.close()


def test_a_prefix_comes_back_from_disk_after_a_kv_service_restart(
    checkpoint, expected, kv_service, tmp_path
):
    port = free_port()
    store = f"disk:{tmp_path / 'kv'}"
    kv_service.start(store, port, tmp_path)
    writer = remote_engine(checkpoint, port)
    try:
        writer.generate([PROMPT_A], greedy(8))
        wait_for(lambda: writer.stats().remote_put_blocks >= SYSTEM_BLOCKS)
    finally:
        writer.close()
    kv_service.stop()
    kv_service.start(store, port, tmp_path)

    reader = remote_engine(checkpoint, port)
    try:
        assert reader.generate([PROMPT_B], greedy(8))[0][0] == expected["b"]
        assert reader.stats().remote_hit_tokens == len(SYSTEM)
    finally:
        reader.close()


def test_a_corrupted_block_on_disk_is_a_miss_and_the_output_is_right(
    checkpoint, expected, kv_service, tmp_path
):
    port = free_port()
    root = tmp_path / "kv"
    kv_service.start(f"disk:{root}", port, tmp_path)
    writer = remote_engine(checkpoint, port)
    try:
        writer.generate([PROMPT_A], greedy(8))
        wait_for(lambda: writer.stats().remote_put_blocks >= SYSTEM_BLOCKS)
    finally:
        writer.close()
    files = sorted(root.glob("??/*.blk"))
    assert files
    for path in files:
        record = bytearray(path.read_bytes())
        record[len(record) // 2] ^= 0xFF
        path.write_bytes(bytes(record))

    reader = remote_engine(checkpoint, port)
    try:
        assert reader.generate([PROMPT_B], greedy(8))[0][0] == expected["b"]
        stats = reader.stats()
        assert stats.remote_hit_tokens == 0
        assert stats.recomputed_tokens == len(PROMPT_B)
    finally:
        reader.close()


def test_engines_serve_through_a_kv_service_outage_and_resume_after_it(
    checkpoint, expected, kv_service, tmp_path
):
    port = free_port()  # nothing listens yet
    # A retry interval long enough that a loaded machine still sees the outage window.
    engine = remote_engine(checkpoint, port, kv_remote_retry_s=1.0)
    try:
        assert engine.generate([PROMPT_A], greedy(8))[0][0] == expected["a"]
        wait_for(lambda: engine.stats().remote_errors > 0)
        assert not engine.stats().remote_available
        assert engine.generate([PROMPT_B], greedy(8))[0][0] == expected["b"]

        kv_service.start("memory", port, tmp_path)
        time.sleep(1.1)  # past the retry interval: the next put reaches the service
        other = [rng.randrange(3, 300) for _ in range(21)]
        engine.generate([other], greedy(2))
        wait_for(lambda: engine.stats().remote_put_blocks >= len(other) // 4)
        assert engine.stats().remote_available
    finally:
        engine.close()


def test_the_engines_store_turns_the_clients_misses_into_remote_unavailable(kv_service, tmp_path):
    """The adapter of the shared client: a real answer passes through; a miss the client
    gave because the service did not answer raises RemoteUnavailable, so that the offload
    manager backs off."""
    port = free_port()
    store = KVServiceStore(f"127.0.0.1:{port}", timeout_s=1.0)
    try:
        fingerprint, block_hash = bytes(16), bytes(range(16))
        with pytest.raises(RemoteUnavailable, match="Lookup"):
            store.lookup(fingerprint, [block_hash])
        with pytest.raises(RemoteUnavailable, match="Put"):
            store.put(fingerprint, [(block_hash, b"kv")])
        kv_service.start("memory", port, tmp_path)
        wait_for(lambda: _answers(store, fingerprint, block_hash))
        assert store.put(fingerprint, [(block_hash, b"kv")]) == 1
        assert store.lookup(fingerprint, [block_hash, bytes(16)]) == 1
        assert store.get(fingerprint, [block_hash, bytes(16)]) == [b"kv", None]
    finally:
        store.close()


def _answers(store: KVServiceStore, fingerprint: bytes, block_hash: bytes) -> bool:
    try:
        store.lookup(fingerprint, [block_hash])
    except RemoteUnavailable:
        return False
    return True


def test_fetched_blocks_are_let_go_once_restored_or_when_their_request_goes_away(
    checkpoint, expected, kv_service, tmp_path
):
    port = free_port()
    kv_service.start("memory", port, tmp_path)
    writer, reader = remote_engine(checkpoint, port), remote_engine(checkpoint, port)
    try:
        writer.generate([PROMPT_A], greedy(8))
        wait_for(lambda: writer.stats().remote_put_blocks >= SYSTEM_BLOCKS)
        assert reader.offload is not None and reader.offload.local is not None
        held = reader.offload.local

        reader.add_request("gone", PROMPT_B, greedy(8))
        reader.step()  # its fetch starts; it waits aside
        assert reader.offload.fetches_in_flight == 1
        assert reader.abort("gone")
        wait_for(lambda: not reader.step() and reader.offload.fetches_in_flight == 0)
        reader.step()  # applies the drop
        assert held.num_fetches_held == 0

        reader.add_request("b", PROMPT_B, greedy(8))
        tokens: list[int] = []

        def admitted() -> bool:
            tokens.extend(t for o in reader.step() for t in o.new_token_ids)
            return reader.stats().restored_blocks_remote == SYSTEM_BLOCKS

        wait_for(admitted)
        # The restore's copies ran in the step that admitted it, and the drop right after.
        assert held.num_fetches_held == 0 and reader.has_unfinished()
        while reader.has_unfinished():
            tokens.extend(t for o in reader.step() for t in o.new_token_ids)
        assert tokens == expected["b"]
    finally:
        writer.close()
        reader.close()
