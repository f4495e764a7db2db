"""`fal deploy`: create a new revision of an app and print its URLs."""

from __future__ import annotations

from enum import StrEnum

import typer

from falcli.cli import render
from falcli.cli.context import connect
from falcli.cli.ship import build_bundle, manifest_option, ship

__all__ = ["deploy"]


class Strategy(StrEnum):
    rolling = "rolling"
    recreate = "recreate"


def deploy(
    ctx: typer.Context,
    ref: str | None = typer.Argument(
        None, metavar="[REF|APP_KEY]", help="path/to/file.py::Class or a [tool.fal.apps] key"
    ),
    auth: str | None = typer.Option(
        None, "--auth", help="private, public or shared (default: pyproject/class, else private)"
    ),
    app_name: str | None = typer.Option(None, "--app-name", help="deployed app name"),
    strategy: Strategy | None = typer.Option(None, "--strategy", help="rolling or recreate"),
    no_cache: bool = typer.Option(False, "--no-cache", help="rebuild the environment"),
    message: str = typer.Option("", "--message", "-m", help="note stored with the revision"),
    reset_scale: bool = typer.Option(
        False, "--reset-scale", help="use this config's scale settings, not the live ones"
    ),
    as_json: bool = typer.Option(
        False, "--json", help="print the result (app, revision, urls) as JSON"
    ),
) -> None:
    """Deploy an app: a new revision behind a permanent URL."""
    bundle = build_bundle(ref, {"auth": auth, "app_name": app_name})
    client = connect(ctx)
    done = ship(
        client,
        bundle,
        auth=auth or manifest_option(bundle, "auth") or "private",
        ephemeral=False,
        strategy=str(strategy or manifest_option(bundle, "deployment_strategy") or "rolling"),
        message=message,
        no_cache=no_cache,
        reset_scale=reset_scale,
    )
    if as_json:
        render.print_json({k: done.get(k) for k in ("app", "revision", "urls")})
        return
    app, revision, urls = done.get("app") or {}, done.get("revision") or {}, done.get("urls") or {}
    rows = [(label, str(urls[label])) for label in ("sync", "queue") if urls.get(label)]
    title = f"Deployed {app.get('owner', '')}/{app.get('name', '')} revision {revision.get('id')}"
    render.print_urls(title, rows)
