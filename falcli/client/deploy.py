"""The deploy helper: upload only the blobs the service lacks, then stream the deploy."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from falcli.client._client import Client
from falcli.client.blobs import BlobSource
from falcli.errors import ServerError

__all__ = ["BundleLike", "DeployEvent", "deploy_bundle", "upload_missing"]

DeployEvent = dict[str, Any]

_FIXES = {
    "build_failed": "fix what the build output above names (a requirement, a Dockerfile step, "
    "the registry), then deploy again",
    "setup_failed": "fix the error in setup() shown above, then deploy again",
    "runner_failed": "fix the error in the app shown above, then deploy again",
    "invalid_manifest": "upgrade falcli and the service to matching versions",
    "startup_timeout": "make setup() faster or raise startup_timeout",
}


class BundleLike(Protocol):
    """What ``falcli.packaging.package`` returns (only the fields this module reads)."""

    @property
    def manifest(self) -> Mapping[str, Any]: ...

    @property
    def blobs(self) -> Mapping[str, BlobSource]: ...


def upload_missing(client: Client, blobs: Mapping[str, BlobSource]) -> list[str]:
    """Upload the blobs the service lacks; returns their hashes (empty when all cached)."""
    missing = client.blobs.missing(sorted(blobs))
    if missing:
        client.blobs.upload({sha: blobs[sha] for sha in missing})
    return missing


def deploy_bundle(
    client: Client,
    bundle: BundleLike,
    *,
    app_name: str,
    auth: str,
    ephemeral: bool = False,
    strategy: str = "rolling",
    message: str = "",
    no_cache: bool = False,
    reset_scale: bool = False,
    on_event: Callable[[DeployEvent], None] | None = None,
) -> DeployEvent:
    """Deploy ``bundle``; every event goes to ``on_event``; returns the ``done`` event.

    Raises ServerError(error_type, detail) on an ``error`` event or a truncated stream.
    """
    upload_missing(client, bundle.blobs)
    request = {
        "manifest": dict(bundle.manifest),
        "app_name": app_name,
        "auth": auth,
        "ephemeral": ephemeral,
        "strategy": strategy,
        "message": message,
        "no_cache": no_cache,
        "reset_scale": reset_scale,
    }
    for event in client.apps.deploy(request):
        if on_event is not None:
            on_event(event)
        kind = event.get("event")
        if kind == "done":
            return event
        if kind == "error":
            raise _deploy_error(app_name, event)
    raise ServerError(
        f"the service closed the deploy stream of {app_name!r} before a result: "
        "see the service log (`fal server status` names it), then deploy again",
        error_type="stream_truncated",
    )


def _deploy_error(app_name: str, event: DeployEvent) -> ServerError:
    error_type = str(event.get("error_type") or "deploy_failed")
    detail = str(event.get("detail") or "")
    fix = _FIXES.get(error_type, "see the detail above, then deploy again")
    return ServerError(
        f"deploying {app_name!r} failed ({error_type}): {fix}",
        error_type=error_type,
        detail=detail,
    )
