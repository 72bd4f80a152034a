"""The gRPC service end to end through its client: storing, finding, fetching, malformed
calls, restarts, and a client whose service is down."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis

from kv_service.keys import payload_checksum
from kv_service.server import KVServer
from switchyard.kv_client import KVClient, KVClientSync
from switchyard.settings import KVServiceSettings
from switchyard.v1 import kv_pb2, kv_pb2_grpc
from tests.kv_service.conftest import FINGERPRINT, OTHER_FINGERPRINT, StartRedis, free_port

HASHES = [bytes([i]) * 16 for i in range(8)]


class RunningService:
    """A :class:`KVServer` on its own event-loop thread, so tests may block on clients."""

    def __init__(self, **settings: Any) -> None:
        defaults: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": 0}
        self.server = KVServer(KVServiceSettings(**{**defaults, **settings}))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._call(self.server.start())
        self.address = f"127.0.0.1:{self.server.port}"

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def stop(self) -> None:
        self._call(self.server.stop(0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


StartService = Callable[..., RunningService]


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[StartService]:
    running: list[RunningService] = []

    def start(**settings: Any) -> RunningService:
        service = RunningService(**{"data_dir": tmp_path, "kv_store": "memory", **settings})
        running.append(service)
        return service

    yield start
    for service in running:
        if service._thread.is_alive():
            service.stop()


def payloads(n: int, size: int) -> list[bytes]:
    return [os.urandom(size) for _ in range(n)]


def test_put_lookup_get_delete_round_trip(start_service: StartService) -> None:
    service = start_service()
    data = [*payloads(3, 5000), os.urandom(3 << 20)]  # the last spans several Get chunks

    async def scenario() -> None:
        client = KVClient(service.address, chunk_bytes=1000)
        assert await client.put_blocks(FINGERPRINT, list(zip(HASHES, data))) == [True] * 4
        assert await client.lookup(FINGERPRINT, HASHES) == 4
        assert await client.get_blocks(FINGERPRINT, HASHES[:5]) == [*data, None]
        assert await client.get_blocks(OTHER_FINGERPRINT, HASHES[:4]) == [None] * 4
        assert await client.lookup(OTHER_FINGERPRINT, HASHES) == 0
        assert await client.delete_blocks(FINGERPRINT, HASHES[:2]) == 2
        assert await client.lookup(FINGERPRINT, HASHES) == 0
        assert await client.get_blocks(FINGERPRINT, HASHES[2:4]) == data[2:4]
        assert client.available and client.num_failures == 0
        await client.close()

    asyncio.run(scenario())


def test_stats_and_metrics_show_hit_rates_per_tier(
    start_service: StartService, tmp_path: Path
) -> None:
    service = start_service(kv_store=f"disk:{tmp_path / 'blocks'}", kv_memory_bytes=1 << 20)
    client = KVClientSync(service.address)
    client.put_blocks(FINGERPRINT, list(zip(HASHES[:2], payloads(2, 4096))))
    client.get_blocks(FINGERPRINT, HASHES[:3])
    stats = client.stats()
    client.close()

    assert stats is not None
    assert stats.store == f"memory+disk:{tmp_path / 'blocks'}"
    memory, disk = stats.tiers
    assert (memory.tier, memory.hits, memory.misses) == ("memory", 2, 1)
    assert memory.hit_rate == pytest.approx(2 / 3)
    assert (disk.tier, disk.hits, disk.misses, disk.blocks) == ("disk", 0, 1, 2)
    assert (stats.block_hits, stats.block_misses) == (2, 1)

    metrics = httpx.get(f"http://127.0.0.1:{service.server.metrics_port}/metrics").text
    assert 'switchyard_kv_hits_total{tier="memory"} 2.0' in metrics
    assert 'switchyard_kv_misses_total{tier="disk"} 1.0' in metrics
    assert "switchyard_kv_block_misses_total 1.0" in metrics


def _header(size: int = 8, **fields: Any) -> kv_pb2.BlockHeader:
    values = {
        "fingerprint": FINGERPRINT,
        "block_hash": HASHES[0],
        "size": size,
        "checksum": payload_checksum(b"x" * size),
        **fields,
    }
    return kv_pb2.BlockHeader(**values)


def _chunk(
    header: kv_pb2.BlockHeader | None = None, data: bytes = b"", offset: int = 0
) -> kv_pb2.PutChunk:
    return kv_pb2.PutChunk(header=header, data=data, offset=offset)


BIG = b"x" * 100_000
# name: (the stream, what the error says)
MALFORMED_PUTS = {
    "no-header": ([_chunk(data=b"x" * 8)], "must carry its header"),
    "short-fingerprint": ([_chunk(_header(fingerprint=b"f" * 15), b"x" * 8)], "fingerprint"),
    "long-hash": ([_chunk(_header(block_hash=b"h" * 32), b"x" * 8)], "block hash"),
    "bad-checksum-length": ([_chunk(_header(checksum=b"c"), b"x" * 8)], "checksum must be"),
    "empty-block": ([_chunk(_header(size=0))], "block size 0"),
    "block-too-large": ([_chunk(_header(size=(1 << 20) + 1))], "block size"),
    "oversized-chunk": (
        [_chunk(_header(size=len(BIG), checksum=payload_checksum(BIG)), BIG)],
        "exceeds",
    ),
    "out-of-order": (
        [_chunk(_header(), b"x" * 4), _chunk(data=b"x" * 4, offset=2)],
        "out of order",
    ),
    "more-bytes-than-declared": ([_chunk(_header(), b"x" * 9)], "more bytes"),
    "ends-inside-a-block": ([_chunk(_header(), b"x" * 4)], "ended inside a block"),
    "header-inside-a-block": (
        [_chunk(_header(), b"x" * 4), _chunk(_header(), b"x" * 8)],
        "before the last block ended",
    ),
}


@pytest.mark.parametrize("name", MALFORMED_PUTS)
def test_a_malformed_put_is_invalid_argument_and_others_are_still_served(
    start_service: StartService, name: str
) -> None:
    service = start_service(max_chunk_bytes=64 * 1024, max_block_bytes=1 << 20)
    with grpc.insecure_channel(service.address) as channel:
        stub = kv_pb2_grpc.KVServiceStub(channel)
        chunks, message = MALFORMED_PUTS[name]
        with pytest.raises(grpc.RpcError) as raised:
            stub.Put(iter(chunks), timeout=5)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in raised.value.details()
        good = [_chunk(_header(), b"x" * 8)]
        assert list(stub.Put(iter(good), timeout=5).stored) == [True]
        lookup = kv_pb2.LookupRequest(fingerprint=FINGERPRINT, block_hashes=HASHES[:1])
        assert stub.Lookup(lookup, timeout=5).num_present == 1


def test_a_payload_that_does_not_match_its_checksum_is_data_loss(
    start_service: StartService,
) -> None:
    service = start_service()
    with grpc.insecure_channel(service.address) as channel:
        stub = kv_pb2_grpc.KVServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Put(iter([kv_pb2.PutChunk(header=_header(), data=b"y" * 8)]), timeout=5)
        assert raised.value.code() == grpc.StatusCode.DATA_LOSS
        lookup = kv_pb2.LookupRequest(fingerprint=FINGERPRINT, block_hashes=HASHES[:1])
        assert stub.Lookup(lookup, timeout=5).num_present == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda stub: stub.Lookup(kv_pb2.LookupRequest(fingerprint=b"f", block_hashes=HASHES)),
        lambda stub: list(stub.Get(kv_pb2.GetRequest(fingerprint=FINGERPRINT, block_hashes=[b""]))),
        lambda stub: stub.Delete(kv_pb2.DeleteRequest(block_hashes=HASHES)),
        lambda stub: stub.Lookup(
            kv_pb2.LookupRequest(fingerprint=FINGERPRINT, block_hashes=HASHES[:1] * 20000)
        ),
    ],
    ids=["lookup-bad-fingerprint", "get-bad-hash", "delete-no-fingerprint", "too-many-hashes"],
)
def test_malformed_keys_are_invalid_argument(
    start_service: StartService, call: Callable[[kv_pb2_grpc.KVServiceStub], object]
) -> None:
    service = start_service()
    with grpc.insecure_channel(service.address) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            call(kv_pb2_grpc.KVServiceStub(channel))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_blocks_on_disk_survive_a_service_restart(
    start_service: StartService, tmp_path: Path
) -> None:
    store = f"disk:{tmp_path / 'blocks'}"
    first = start_service(kv_store=store)
    port = first.server.port
    data = payloads(3, 10_000)
    client = KVClientSync(first.address, retry_after_s=0.1)
    assert client.put_blocks(FINGERPRINT, list(zip(HASHES, data))) == [True] * 3
    first.stop()
    assert client.lookup(FINGERPRINT, HASHES) == 0  # down: a miss, not an error
    assert not client.client.available

    start_service(kv_store=store, port=port)
    deadline = time.monotonic() + 10
    while client.lookup(FINGERPRINT, HASHES) != 3:
        assert time.monotonic() < deadline, "the client did not reconnect"
        time.sleep(0.05)
    assert client.get_blocks(FINGERPRINT, HASHES[:4]) == [*data, None]
    assert client.client.available
    client.close()


def test_a_client_of_a_service_that_is_down_misses_fast() -> None:
    async def scenario() -> None:
        client = KVClient(f"127.0.0.1:{free_port()}", timeout_s=1.0, retry_after_s=60)
        started = time.monotonic()
        assert await client.lookup(FINGERPRINT, HASHES) == 0
        assert await client.get_blocks(FINGERPRINT, HASHES[:2]) == [None, None]
        assert await client.put_blocks(FINGERPRINT, [(HASHES[0], b"kv")]) == [False]
        assert await client.delete_blocks(FINGERPRINT, HASHES) == 0
        assert await client.stats() is None
        assert time.monotonic() - started < 1.0
        assert not client.available
        assert client.num_failures == 1  # after the first failure it stops calling
        assert client.last_error is not None and client.last_error.startswith("Lookup: ")
        await client.close()

    asyncio.run(scenario())


def test_the_sync_client_submits_without_blocking_and_checks_keys(
    start_service: StartService,
) -> None:
    service = start_service()
    client = KVClientSync(service.address)
    data = payloads(2, 2048)
    put = client.submit(client.client.put_blocks(FINGERPRINT, list(zip(HASHES, data))))
    assert put.result(timeout=5) == [True, True]
    assert client.submit(client.client.get_blocks(FINGERPRINT, HASHES[:2])).result(5) == data
    with pytest.raises(ValueError, match="fingerprint"):
        client.lookup(b"short", HASHES)
    with pytest.raises(ValueError, match="block hash"):
        client.get_blocks(FINGERPRINT, [b"short"])
    with pytest.raises(ValueError, match="empty"):
        client.put_blocks(FINGERPRINT, [(HASHES[0], b"")])
    client.close()


def test_redis_down_behind_the_service_gives_misses_not_errors(
    start_service: StartService, start_redis: StartRedis
) -> None:
    url = start_redis()
    service = start_service(kv_store=url, kv_memory_bytes=0)
    client = KVClientSync(service.address)
    data = payloads(2, 2048)
    assert client.put_blocks(FINGERPRINT, list(zip(HASHES, data))) == [True, True]
    redis.Redis.from_url(url).shutdown(nosave=True)

    assert client.lookup(FINGERPRINT, HASHES) == 0
    assert client.get_blocks(FINGERPRINT, HASHES[:2]) == [None, None]
    assert client.put_blocks(FINGERPRINT, list(zip(HASHES, data))) == [False, False]
    assert client.client.available  # the service itself is fine
    stats = client.stats()
    assert stats is not None and stats.tiers[0].errors >= 3
    client.close()
