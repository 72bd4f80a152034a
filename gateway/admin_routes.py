"""The admin API: create, list, limit and revoke API keys. Guarded by the admin key
(``Authorization: Bearer ADMIN_KEY``); without an admin key configured it answers 403.

| method and path | what it does |
| --- | --- |
| ``POST /admin/keys`` | creates a key; the answer holds the key itself, the only time it is shown |
| ``GET /admin/keys`` | lists keys (ids, names, limits, spent tokens; never the keys) |
| ``GET /admin/keys/{id}`` | one key |
| ``PATCH /admin/keys/{id}`` | sets limits (``null``: back to the default) or ``revoked`` |
| ``DELETE /admin/keys/{id}`` | revokes the key; it is refused from the next request on |
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from gateway.access import AccessControl, presented_key
from gateway.api_keys import LIMIT_FIELDS, KeyLimits, KeyRecord, hash_key, new_key, new_key_id
from gateway.errors import OpenAIError
from gateway.quota import QuotaStoreUnavailable

Limit = int | None


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=200)
    rpm: Limit = Field(default=None, ge=0)
    tpm: Limit = Field(default=None, ge=0)
    concurrent: Limit = Field(default=None, ge=0)
    budget: Limit = Field(default=None, ge=0)


class UpdateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rpm: Limit = Field(default=None, ge=0)
    tpm: Limit = Field(default=None, ge=0)
    concurrent: Limit = Field(default=None, ge=0)
    budget: Limit = Field(default=None, ge=0)
    revoked: bool | None = None


def build_admin_router(control: AccessControl, admin_key: str) -> APIRouter:
    admin_hash = hash_key(admin_key) if admin_key else ""
    store = control.store
    router = APIRouter(prefix="/admin")

    def check_admin(request: Request) -> None:
        if not admin_hash:
            raise OpenAIError(403, "the admin API is disabled: no admin key is configured")
        key = presented_key(request.scope)
        if key is None or not hmac.compare_digest(hash_key(key), admin_hash):
            raise OpenAIError(401, "an admin key is required", code="invalid_api_key")

    async def shown(record: KeyRecord) -> dict[str, Any]:
        return record.public(await store.spent(record.id))

    async def guarded(call: Any) -> Any:
        try:
            return await call
        except QuotaStoreUnavailable as exc:
            raise OpenAIError(503, str(exc), code="rate_limit_store_unavailable") from exc

    async def create(body: CreateKey, request: Request) -> JSONResponse:
        check_admin(request)
        key = new_key()
        record = KeyRecord(
            id=new_key_id(),
            key_hash=hash_key(key),
            name=body.name,
            limits=KeyLimits(**{name: getattr(body, name) for name in LIMIT_FIELDS}),
        )
        await guarded(store.put_key(record))
        return JSONResponse({**record.public(0), "key": key}, status_code=201)

    async def list_keys(request: Request) -> JSONResponse:
        check_admin(request)
        records = await guarded(store.list_keys())
        data = [await guarded(shown(record)) for record in records]
        return JSONResponse({"object": "list", "data": data})

    async def get_key(key_id: str, request: Request) -> JSONResponse:
        check_admin(request)
        record = await guarded(store.get_key(key_id))
        if record is None:
            raise OpenAIError(404, f"no API key with id {key_id!r}")
        return JSONResponse(await guarded(shown(record)))

    async def update(key_id: str, body: UpdateKey, request: Request) -> JSONResponse:
        check_admin(request)
        limits = {
            name: getattr(body, name) for name in LIMIT_FIELDS if name in body.model_fields_set
        }
        record = await guarded(store.update_key(key_id, limits=limits, revoked=body.revoked))
        if record is None:
            raise OpenAIError(404, f"no API key with id {key_id!r}")
        return JSONResponse(await guarded(shown(record)))

    async def revoke(key_id: str, request: Request) -> JSONResponse:
        check_admin(request)
        record = await guarded(store.update_key(key_id, limits={}, revoked=True))
        if record is None:
            raise OpenAIError(404, f"no API key with id {key_id!r}")
        return JSONResponse(await guarded(shown(record)))

    router.add_api_route("/keys", create, methods=["POST"], response_model=None)
    router.add_api_route("/keys", list_keys, methods=["GET"], response_model=None)
    router.add_api_route("/keys/{key_id}", get_key, methods=["GET"], response_model=None)
    router.add_api_route("/keys/{key_id}", update, methods=["PATCH"], response_model=None)
    router.add_api_route("/keys/{key_id}", revoke, methods=["DELETE"], response_model=None)
    return router
