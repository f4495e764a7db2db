"""``/v1/keys``: create, list and revoke API keys.

A key acts for one owner. Any key may make more keys for its own owner; making keys for
another owner, or admin keys, takes an admin key. A non-admin sees and revokes only its own
owner's keys. A secret is returned once, by ``POST``, and never again.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from buildsvc.api.deps import ApiError, caller, json_object, services, target_owner
from buildsvc.api.views import key_view
from buildsvc.auth import OwnerError
from buildsvc.records import KeyRecord

__all__ = ["router"]

router = APIRouter()


@router.post("/v1/keys")
async def create_key(request: Request, key: KeyRecord = Depends(caller)) -> dict[str, Any]:
    body = await json_object(request)
    owner, name, admin = body.get("owner"), body.get("name") or "", bool(body.get("admin"))
    if (owner is not None and not isinstance(owner, str)) or not isinstance(name, str):
        raise ApiError(400, "'owner' and 'name' must be strings", "invalid_request")
    if admin and not key.admin:
        raise ApiError(
            403, f"key {key.key_id} is not an admin key: only admins create admin keys", "forbidden"
        )
    try:
        record, full_key = services(request).keys.create(target_owner(key, owner), name, admin)
    except OwnerError as exc:
        raise ApiError(400, str(exc), "invalid_owner") from exc
    return {"key_id": record.key_id, "key": full_key, "owner": record.owner, "admin": admin}


@router.get("/v1/keys")
async def list_keys(request: Request, key: KeyRecord = Depends(caller)) -> dict[str, Any]:
    keys = services(request).keys.list(None if key.admin else key.owner)
    return {"keys": [key_view(k) for k in keys]}


@router.delete("/v1/keys/{key_id}")
async def revoke_key(
    request: Request, key_id: str, key: KeyRecord = Depends(caller)
) -> dict[str, Any]:
    keyring = services(request).keys
    target = keyring.get(key_id)
    if target is None or not (key.admin or target.owner == key.owner):
        raise ApiError(
            404, f"key {key_id!r} not found among your keys: see `fal keys list`", "not_found"
        )
    keyring.revoke(key_id)
    return {"key_id": key_id, "revoked": True}
