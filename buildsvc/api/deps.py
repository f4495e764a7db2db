"""What every handler shares: the service components, the caller's key, the error shape.

Errors leave the API as ``{"detail": ..., "error_type": ...}`` with a status code (contract 2);
handlers raise ``ApiError`` and never build error responses themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from buildsvc.auth import INVALID_KEY, MISSING_KEY, Keyring
from buildsvc.blobs import BlobStore
from buildsvc.config import ServerConfig
from buildsvc.deploy import Deployer
from buildsvc.records import KeyRecord
from buildsvc.store import Store

__all__ = [
    "ApiError",
    "Services",
    "base_url",
    "caller",
    "error_response",
    "install_error_handlers",
    "json_object",
    "services",
    "target_owner",
]

# A management body is a manifest or a short command; blob bytes go to /v1/blobs, which has
# its own cap. Read no more than this into memory (100,000 manifest files are ~15 MB).
_MAX_JSON_BYTES = 64 * 1024 * 1024


@dataclass
class Services:
    """The components the lifespan built; handlers reach them through ``services()``."""

    config: ServerConfig
    store: Store
    keys: Keyring
    blobs: BlobStore
    deployer: Deployer
    fleet: Any
    logs: Any


class ApiError(Exception):
    def __init__(self, status: int, detail: str, error_type: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.error_type = error_type


def error_response(status: int, detail: str, error_type: str) -> JSONResponse:
    return JSONResponse(
        {"detail": detail, "error_type": error_type},
        status_code=status,
        headers={"x-fal-error-type": error_type},
    )


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


def caller(request: Request) -> KeyRecord:
    """The dependency every authenticated route takes: the key that signed the request."""
    header = request.headers.get("authorization")
    if not header:
        raise ApiError(401, MISSING_KEY, "unauthorized")
    key = services(request).keys.authenticate(header)
    if key is None:
        raise ApiError(401, INVALID_KEY, "unauthorized")
    return key


def target_owner(key: KeyRecord, owner: str | None) -> str:
    """The owner a call acts for: the key's own, or another one if the key is an admin's."""
    if owner is None or owner == key.owner:
        return key.owner
    if not key.admin:
        raise ApiError(
            403,
            f"key {key.key_id} of owner {key.owner!r} cannot act for owner {owner!r}: "
            "only an admin key can; use a key of that owner",
            "forbidden",
        )
    return owner


def base_url(request: Request) -> str:
    """The URL callers should use: ``public_url`` if configured, else what they called."""
    configured = services(request).config.public_url
    return (configured or str(request.base_url)).rstrip("/")


async def json_object(request: Request) -> dict[str, Any]:
    """The request body, which must be a JSON object of at most ``_MAX_JSON_BYTES``."""
    raw = await _capped_body(request, _MAX_JSON_BYTES)
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"request body is not JSON: {exc}", "invalid_request") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "request body: expected a JSON object", "invalid_request")
    return body


async def _capped_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is (or declares to be) over ``limit``."""
    too_large = ApiError(
        413, f"request body over {limit} bytes: a management call carries JSON only; upload "
        "file contents to /v1/blobs", "too_large",
    )  # fmt: skip
    declared = request.headers.get("content-length", "")
    if declared.strip().isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def install_error_handlers(app: Any) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.detail, exc.error_type)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, str(exc.detail), kind)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}"
        for err in exc.errors()
    )
    return error_response(422, f"invalid request: {problems}", "invalid_request")
