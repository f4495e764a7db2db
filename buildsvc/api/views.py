"""How records look on the wire (contract 2 of docs/architecture.md), in one place.

Handlers and the deploy stream both serialise through these, so an app or a revision has one
shape wherever it appears.
"""

from __future__ import annotations

from typing import Any

from buildsvc.records import AppRecord, KeyRecord, RevisionRecord

__all__ = ["app_urls", "app_view", "key_view", "revision_view"]


def app_urls(base_url: str, owner: str, name: str) -> dict[str, str]:
    """Where callers reach the app: sync through the gateway, queue under ``/queue``."""
    base = base_url.rstrip("/")
    return {"sync": f"{base}/{owner}/{name}", "queue": f"{base}/queue/{owner}/{name}"}


def app_view(app: AppRecord, base_url: str, runners: int = 0) -> dict[str, Any]:
    return {
        "name": app.name,
        "owner": app.owner,
        "auth": app.auth,
        "revision": app.current_revision,
        "ephemeral": app.ephemeral,
        "url": app_urls(base_url, app.owner, app.name)["sync"],
        "runners": runners,
        "scale": app.scale,
        "created_at": app.created_at,
    }


def revision_view(rev: RevisionRecord) -> dict[str, Any]:
    return {
        "id": rev.id,
        "created_at": rev.created_at,
        "message": rev.message,
        "bundle_hash": rev.bundle_hash,
        "env_key": rev.env_key,
        "python": rev.manifest.get("python", ""),
        "kind": rev.manifest.get("kind", "app"),
    }


def key_view(key: KeyRecord) -> dict[str, Any]:
    return {
        "key_id": key.key_id,
        "owner": key.owner,
        "name": key.name,
        "admin": key.admin,
        "created_at": key.created_at,
        "revoked": key.revoked,
    }
