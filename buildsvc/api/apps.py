"""``/v1/apps``: deploy (an NDJSON event stream), list, get, delete, revisions, logs.

An app is managed by its owner; an admin key may pass ``?owner=NAME`` to act on another
owner's apps. The deploy orchestration itself lives in ``buildsvc.deploy``.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from buildsvc.api.deps import ApiError, base_url, caller, json_object, services, target_owner
from buildsvc.api.views import app_view, revision_view
from buildsvc.auth import OwnerError, check_owner
from buildsvc.deploy import DeployError
from buildsvc.records import AppRecord, KeyRecord

__all__ = ["router"]

router = APIRouter()

_NDJSON = "application/x-ndjson"
_APP_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # probe the log hub only with real names
_LOG_FIELDS = ("timestamp", "level", "source", "runner_id", "request_id", "message")


@router.post("/v1/apps/deploy")
async def deploy(request: Request, key: KeyRecord = Depends(caller)) -> Response:
    body = await json_object(request)
    owner = target_owner(key, body.get("owner"))
    deployer = services(request).deployer
    try:
        check_owner(owner)
        plan = deployer.plan(owner, body)
    except OwnerError as exc:
        return _refused(400, str(exc), "invalid_owner")
    except DeployError as exc:
        return _refused(exc.status, exc.detail, exc.error_type)
    events = deployer.run(plan, base_url(request))
    return StreamingResponse(_ndjson(events), media_type=_NDJSON)


def _refused(status: int, detail: str, error_type: str) -> JSONResponse:
    """A refusal before streaming: an error body that is also a one-line error event."""
    body = {"event": "error", "error_type": error_type, "detail": detail}
    return JSONResponse(body, status_code=status, headers={"x-fal-error-type": error_type})


async def _ndjson(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async for event in events:
        yield json.dumps(event).encode() + b"\n"


@router.get("/v1/apps")
async def list_apps(
    request: Request, owner: str | None = None, key: KeyRecord = Depends(caller)
) -> dict[str, Any]:
    svc = services(request)
    apps = svc.store.list_apps(target_owner(key, owner))
    return {"apps": [_view(request, app) for app in apps]}


@router.get("/v1/apps/{name}")
async def get_app(
    request: Request, name: str, owner: str | None = None, key: KeyRecord = Depends(caller)
) -> dict[str, Any]:
    return _view(request, _find(request, key, name, owner))


@router.delete("/v1/apps/{name}")
async def delete_app(
    request: Request, name: str, owner: str | None = None, key: KeyRecord = Depends(caller)
) -> dict[str, Any]:
    app = _find(request, key, name, owner)
    svc = services(request)
    await svc.fleet.stop_app(app.owner, app.name)
    svc.store.delete_app(app.owner, app.name)
    return {"deleted": f"{app.owner}/{app.name}"}


@router.get("/v1/apps/{name}/revisions")
async def revisions(
    request: Request, name: str, owner: str | None = None, key: KeyRecord = Depends(caller)
) -> dict[str, Any]:
    app = _find(request, key, name, owner)
    revs = services(request).store.list_revisions(app.owner, app.name)
    return {"revisions": [revision_view(rev) for rev in revs]}


@router.get("/v1/apps/{name}/logs")
async def logs(
    request: Request,
    name: str,
    owner: str | None = None,
    follow: bool = False,
    limit: int = 1000,
    key: KeyRecord = Depends(caller),
) -> Response:
    hub = services(request).logs
    who = target_owner(key, owner)
    known = services(request).store.get_app(who, name) is not None
    if not known and not (_APP_NAME.fullmatch(name) and hub.recent(who, name, 1)):
        raise ApiError(404, _no_app(who, name), "not_found")
    if follow:  # Starlette cancels the generator when the client disconnects
        records = _log_lines(hub.follow(who, name))
        return StreamingResponse(records, media_type=_NDJSON)
    lines = [_log_line(rec) for rec in hub.recent(who, name, max(1, min(limit, 100_000)))]
    return Response(b"".join(lines), media_type=_NDJSON)


async def _log_lines(records: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    async for rec in records:
        yield _log_line(rec)


def _log_line(rec: Any) -> bytes:
    data = rec.to_dict()
    return json.dumps({field: data.get(field) for field in _LOG_FIELDS}).encode() + b"\n"


def _find(request: Request, key: KeyRecord, name: str, owner: str | None) -> AppRecord:
    who = target_owner(key, owner)
    app = services(request).store.get_app(who, name)
    if app is None:
        raise ApiError(404, _no_app(who, name), "not_found")
    return app


def _no_app(owner: str, name: str) -> str:
    return f"app {owner}/{name} not found: deploy it first, or list apps with `fal apps list`"


def _view(request: Request, app: AppRecord) -> dict[str, Any]:
    runners = services(request).fleet.list_runners(owner=app.owner, app=app.name)
    return app_view(app, base_url(request), len(runners))
