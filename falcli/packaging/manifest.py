"""The bundle manifest: the one wire schema the CLI, the service and the runner share.

It lives on the client side as plain data (``falcli`` never imports ``buildsvc``; the service
imports this module). See ``docs/architecture.md`` (contract 1) for the field meanings.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, TypedDict

__all__ = [
    "FORMAT_VERSION",
    "Manifest",
    "blob_requirement",
    "canonical_json",
    "manifest_hash",
    "parse_blob_requirement",
    "seal",
]

FORMAT_VERSION = 1
_BLOB_PREFIX = "/blob:"


class Manifest(TypedDict):
    format: int
    app_name: str
    kind: Literal["app", "function"]
    python: str
    payload: str
    requirements: list[list[str]]
    files: dict[str, str]
    options: dict[str, Any]
    openapi: dict[str, Any]
    hash: str


def canonical_json(obj: Any) -> bytes:
    """Serialise ``obj`` the one way hashes are computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def manifest_hash(manifest: dict[str, Any]) -> str:
    """sha256 of the canonical manifest without its own ``hash`` key."""
    body = {k: v for k, v in manifest.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def seal(manifest: dict[str, Any]) -> Manifest:
    """Return ``manifest`` with its ``hash`` filled in."""
    sealed = dict(manifest)
    sealed["hash"] = manifest_hash(manifest)
    return sealed  # type: ignore[return-value]


def blob_requirement(sha256: str, filename: str, extras: str = "") -> str:
    """The requirement string that stands for an uploaded sdist: ``/blob:<sha>:<file>[extra]``."""
    return f"{_BLOB_PREFIX}{sha256}:{filename}{extras}"


def parse_blob_requirement(req: str) -> tuple[str, str, str] | None:
    """Split a blob requirement into (sha256, filename, extras); None for ordinary ones."""
    if not req.startswith(_BLOB_PREFIX):
        return None
    sha, _, rest = req[len(_BLOB_PREFIX) :].partition(":")
    filename, bracket, extras = rest.partition("[")
    return sha, filename, (bracket + extras) if bracket else ""
