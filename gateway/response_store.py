"""Stored responses of ``/v1/responses``, kept so that ``previous_response_id`` can continue
them: in Redis when the gateway has one (every gateway sees every response), else in this
process's memory. Entries expire after ``response_ttl_s``."""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from typing import Any


class ResponseStore(ABC):
    @abstractmethod
    async def put(self, response_id: str, record: dict[str, Any]) -> None: ...

    @abstractmethod
    async def get(self, response_id: str) -> dict[str, Any] | None: ...

    async def close(self) -> None:
        return None


class MemoryResponseStore(ResponseStore):
    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._entries: dict[str, tuple[float, str]] = {}

    async def put(self, response_id: str, record: dict[str, Any]) -> None:
        now = time.monotonic()
        if len(self._entries) >= self._max_entries:
            expired = [key for key, (until, _) in self._entries.items() if until <= now]
            for key in expired or list(self._entries)[: self._max_entries // 10]:
                del self._entries[key]
        self._entries[response_id] = (now + self._ttl_s, json.dumps(record))

    async def get(self, response_id: str) -> dict[str, Any] | None:
        entry = self._entries.get(response_id)
        if entry is None or entry[0] <= time.monotonic():
            self._entries.pop(response_id, None)
            return None
        return json.loads(entry[1])


class RedisResponseStore(ResponseStore):
    def __init__(self, url: str, ttl_s: float, prefix: str = "switchyard:response:") -> None:
        import redis.asyncio as redis_asyncio

        self._redis = redis_asyncio.Redis.from_url(
            url, socket_connect_timeout=1.0, socket_timeout=2.0
        )
        self._ttl_ms = int(ttl_s * 1000)
        self._prefix = prefix

    async def put(self, response_id: str, record: dict[str, Any]) -> None:
        await self._redis.set(self._prefix + response_id, json.dumps(record), px=self._ttl_ms)

    async def get(self, response_id: str) -> dict[str, Any] | None:
        raw = await self._redis.get(self._prefix + response_id)
        return json.loads(raw) if raw else None

    async def close(self) -> None:
        await self._redis.aclose()
