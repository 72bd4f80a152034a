"""Builds the gateway's :class:`~gateway.access.AccessControl` from its settings: the store
(Redis when ``redis_url`` is set, else memory), the configured keys, the default limits."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from gateway.access import AccessControl
from gateway.api_keys import load_config_keys
from gateway.quota import DefaultLimits, MemoryQuota, QuotaStore, RedisQuota
from switchyard.settings import GatewaySettings


def build_access_control(
    settings: GatewaySettings, registry: CollectorRegistry | None = None
) -> AccessControl:
    config_keys = load_config_keys(settings.api_keys, settings.api_key_file)
    store: QuotaStore = (
        RedisQuota(
            settings.redis_url, concurrency_ttl_ms=int(settings.request_timeout_s * 1000) + 60_000
        )
        if settings.redis_url
        else MemoryQuota()
    )
    return AccessControl(
        store,
        config_keys,
        DefaultLimits(
            rpm=settings.rate_limit_rpm,
            tpm=settings.rate_limit_tpm,
            concurrent=settings.rate_limit_concurrent,
        ),
        auth_enabled=bool(config_keys or settings.admin_key),
        fail_open=settings.rate_limit_fail_open,
        refusals=Counter(
            "switchyard_gateway_refused_requests",
            "requests the access middleware refused, by reason (missing_key, unknown, revoked, "
            "requests, tokens, concurrent, budget, store_unavailable)",
            ["reason"],
            registry=registry,
        )
        if registry is not None
        else None,
    )
