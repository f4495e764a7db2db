"""``/v1/runners``: the live runners of the caller's apps (or another owner's, for admins)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from buildsvc.api.deps import caller, services, target_owner
from buildsvc.records import KeyRecord

__all__ = ["router"]

router = APIRouter()


@router.get("/v1/runners")
async def list_runners(
    request: Request,
    app: str | None = None,
    owner: str | None = None,
    key: KeyRecord = Depends(caller),
) -> dict[str, Any]:
    fleet = services(request).fleet
    runners = fleet.list_runners(owner=target_owner(key, owner), app=app)
    return {"runners": [runner.to_dict() for runner in runners]}
