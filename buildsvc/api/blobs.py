"""``/v1/blobs``: which blobs the service lacks, and tar uploads of them.

Blobs are content-addressed and shared by all owners (a hash names its bytes), so any valid
key may upload. The request body is spooled (memory, then disk) under a byte cap before the
tar is read in a worker thread, keeping the event loop free while hashes are checked.
"""

from __future__ import annotations

import asyncio
import tempfile
from typing import IO, Any

from fastapi import APIRouter, Depends, Request

from buildsvc.api.deps import ApiError, caller, json_object, services
from buildsvc.blobs import BlobError, is_sha256
from buildsvc.records import KeyRecord

__all__ = ["router"]

router = APIRouter()

_MAX_HASHES = 100_000
_SPOOL_MEMORY = 16 * 1024 * 1024
_TAR_OVERHEAD = 1024  # per member: header plus padding, so the raw cap admits a full upload


@router.post("/v1/blobs/missing")
async def missing(request: Request, key: KeyRecord = Depends(caller)) -> dict[str, Any]:
    body = await json_object(request)
    hashes = body.get("hashes")
    if not isinstance(hashes, list) or len(hashes) > _MAX_HASHES:
        raise ApiError(
            400,
            f"'hashes': expected a list of at most {_MAX_HASHES} sha256 hex strings",
            "invalid_request",
        )
    bad = [h for h in hashes if not is_sha256(h)]
    if bad:
        raise ApiError(
            400, f"'hashes' holds {bad[0]!r:.80}: expected 64 lowercase hex digits", "bad_hash"
        )
    return {"missing": services(request).blobs.missing(hashes)}


@router.post("/v1/blobs")
async def upload(request: Request, key: KeyRecord = Depends(caller)) -> dict[str, Any]:
    blobs = services(request).blobs
    limit = blobs.max_bytes + blobs.max_members * _TAR_OVERHEAD
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY) as spool:
        await _spool(request, spool, limit)
        spool.seek(0)
        try:
            stored = await asyncio.to_thread(blobs.extract_tar, spool)
        except BlobError as exc:
            raise ApiError(400, str(exc), "invalid_upload") from exc
    return {"stored": stored}


async def _spool(request: Request, spool: IO[bytes], limit: int) -> None:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(
                413, f"upload body exceeds {limit} bytes: upload in smaller batches", "too_large"
            )
        spool.write(chunk)
