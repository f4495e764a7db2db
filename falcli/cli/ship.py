"""Shared by `fal run` and `fal deploy`: resolve the target, package it, deploy it.

The heavy imports (project config, packaging, cloudpickle) happen here, inside functions, so
``fal --help`` never pays for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from falcli.cli import render

if TYPE_CHECKING:
    from falcli.client import BundleLike, Client, DeployEvent

__all__ = ["build_bundle", "manifest_option", "ship"]


def build_bundle(ref: str | None, overrides: dict[str, Any]) -> BundleLike:
    """Resolve ``ref`` from the current directory, show project warnings, package it."""
    from falcli.packaging import package
    from falcli.project import resolve_target

    target = resolve_target(ref, Path.cwd())
    project = target.project
    for warning in project.warnings if project is not None else []:
        render.print_warning(warning)
    with render.status("Packaging..."):
        bundle: BundleLike = package(
            target, overrides={k: v for k, v in overrides.items() if v is not None}
        )
    return bundle


def _show_event(event: dict[str, Any]) -> None:
    kind = event.get("event")
    if kind == "log":
        render.print_log(str(event.get("message", "")))
    elif kind == "stage":
        render.print_log(f"==> {event.get('stage')}")


def ship(
    client: Client,
    bundle: BundleLike,
    *,
    auth: str,
    ephemeral: bool,
    app_name: str | None = None,
    **options: Any,
) -> DeployEvent:
    """Upload and deploy ``bundle``, streaming the build log to stderr; the ``done`` event."""
    from falcli.client import deploy_bundle

    app_name = app_name or str(bundle.manifest.get("app_name", ""))
    return deploy_bundle(
        client,
        bundle,
        app_name=app_name,
        auth=auth,
        ephemeral=ephemeral,
        on_event=_show_event,
        **options,
    )


def manifest_option(bundle: BundleLike, name: str) -> Any:
    options = bundle.manifest.get("options") or {}
    return options.get(name) if isinstance(options, dict) else None
