"""``/v1/health`` (no key needed: the CLI's liveness probe) and ``/v1/whoami``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from buildsvc import __version__
from buildsvc.api.deps import caller
from buildsvc.records import KeyRecord

__all__ = ["router"]

router = APIRouter()


@router.get("/v1/health")
async def health() -> dict[str, Any]:
    return {"version": __version__}


@router.get("/v1/whoami")
async def whoami(key: KeyRecord = Depends(caller)) -> dict[str, Any]:
    return {"owner": key.owner, "key_id": key.key_id, "admin": key.admin}
