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
from falcli.errors import OptionError
from falcli.options import check_known, validate_option

__all__ = ["router"]

router = APIRouter()

# What `fal apps scale` may change on a live app (validated by falcli.options' rules).
_SCALE_KEYS = (
    "min_concurrency", "max_concurrency", "keep_alive", "max_multiplexing",
    "concurrency_buffer", "concurrency_buffer_perc", "scaling_delay",
)  # fmt: skip

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


@router.patch("/v1/apps/{name}/scale")
async def scale(
    request: Request, name: str, owner: str | None = None, key: KeyRecord = Depends(caller)
) -> dict[str, Any]:
    """Change a live app's scale settings; the fleet applies them at once. The next deploy
    keeps them (unless ``reset_scale`` / ``app_scale_settings``)."""
    app = _find(request, key, name, owner)
    svc = services(request)
    changes = _scale_changes(name, await json_object(request))
    resolved = svc.store.resolve(app.owner, app.name)
    options = resolved[1].manifest.get("options", {}) if resolved and resolved[1] else {}
    merged = {**app.scale, **changes}
    _check_bounds(name, {**options, **merged})
    updated = svc.store.update_scale(app.owner, app.name, merged)
    if updated is None:  # deleted meanwhile
        raise ApiError(404, _no_app(app.owner, name), "not_found")
    svc.fleet.update_scale(updated)
    return _view(request, updated)


def _scale_changes(name: str, body: dict[str, Any]) -> dict[str, Any]:
    where = f"fal apps scale {name}"
    try:
        check_known(body, where=where, known=_SCALE_KEYS)
        changes = {k: validate_option(k, v, where=where) for k, v in body.items() if v is not None}
    except OptionError as exc:
        raise ApiError(400, str(exc), "invalid_scale") from None
    if not changes:
        raise ApiError(400, f"{where}: nothing to change: pass at least one of "
                       + ", ".join(_SCALE_KEYS) + ', e.g. {"min_concurrency": 1}',
                       "invalid_scale")  # fmt: skip
    return changes


def _check_bounds(name: str, options: dict[str, Any]) -> None:
    low, high = options.get("min_concurrency") or 0, options.get("max_concurrency") or 10
    if low > high:
        raise ApiError(400, f"fal apps scale {name}: min_concurrency = {low} is greater than "
                       f"max_concurrency = {high}: lower min_concurrency or raise "
                       f"max_concurrency to at least {low}", "invalid_scale")  # fmt: skip


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
