"""`fal apps list | get | scale | delete | revisions`."""

from __future__ import annotations

from typing import Any

import typer

from falcli.cli import render
from falcli.cli.context import connect

__all__ = ["apps_app"]

apps_app = typer.Typer(help="List, inspect, scale and delete apps.", no_args_is_help=True)

_JSON = typer.Option(False, "--json", help="print JSON instead of a table")
# The live scale settings, in the order `get` and `scale` show them.
_SCALE = ("min_concurrency", "max_concurrency", "max_multiplexing", "keep_alive",
          "concurrency_buffer", "concurrency_buffer_perc", "scaling_delay")  # fmt: skip


def _flag(name: str, what: str) -> Any:
    return typer.Option(None, f"--{name.replace('_', '-')}", help=what, show_default=False)


@apps_app.command("list")
def list_apps(ctx: typer.Context, as_json: bool = _JSON) -> None:
    """List the apps you can see, with their live scale."""
    apps = connect(ctx).apps.list()
    if as_json:
        render.print_json({"apps": apps})
        return
    columns = ("name", "owner", "auth", "revision", "ephemeral", "runners", "min", "max",
               "keep_alive", "url")  # fmt: skip
    rows = [_list_row(a, a.get("scale") or {}) for a in apps]
    render.print_table("Apps", columns, rows)


def _list_row(app: dict[str, Any], scale: dict[str, Any]) -> list[Any]:
    head = [app.get(c) for c in ("name", "owner", "auth", "revision", "ephemeral", "runners")]
    live = [scale.get(k) for k in ("min_concurrency", "max_concurrency", "keep_alive")]
    return [*head, *live, app.get("url")]


@apps_app.command("get")
def get_app(
    ctx: typer.Context, name: str = typer.Argument(..., help="app name"), as_json: bool = _JSON
) -> None:
    """Show one app and its live scale settings."""
    _show(connect(ctx).apps.get(name), as_json)


@apps_app.command("scale")
def scale_app(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="app name"),
    min_concurrency: int = _flag("min_concurrency", "runners kept warm at all times"),
    max_concurrency: int = _flag("max_concurrency", "most runners at once"),
    keep_alive: int = _flag("keep_alive", "seconds an idle runner stays"),
    max_multiplexing: int = _flag("max_multiplexing", "requests per runner (new runners)"),
    concurrency_buffer: int = _flag("concurrency_buffer", "extra warm runners above load"),
    concurrency_buffer_perc: int = _flag("concurrency_buffer_perc", "extra runners, % of load"),
    scaling_delay: int = _flag("scaling_delay", "seconds requests wait before a scale-up"),
    as_json: bool = _JSON,
) -> None:
    """Change a live app's scale (applied at once, kept by later deploys); without a flag,
    show it."""
    values = (min_concurrency, max_concurrency, max_multiplexing, keep_alive,
              concurrency_buffer, concurrency_buffer_perc, scaling_delay)  # fmt: skip
    given = {k: v for k, v in zip(_SCALE, values, strict=True) if v is not None}
    client = connect(ctx).apps
    _show(client.scale(name, given) if given else client.get(name), as_json)


def _show(app: dict[str, Any], as_json: bool) -> None:
    if as_json:
        render.print_json(app)
        return
    scale = app.get("scale") or {}
    pairs = [(k, app.get(k)) for k in ("name", "owner", "auth", "revision", "runners", "url")]
    render.print_kv(pairs + [(k, scale.get(k, "-")) for k in _SCALE])


@apps_app.command("delete")
def delete_app(ctx: typer.Context, name: str = typer.Argument(..., help="app name")) -> None:
    """Delete an app: its runners stop and its URL stops answering."""
    connect(ctx).apps.delete(name)
    typer.echo(f"Deleted app {name}")


@apps_app.command("revisions")
def revisions(
    ctx: typer.Context, name: str = typer.Argument(..., help="app name"), as_json: bool = _JSON
) -> None:
    """List an app's revisions."""
    revs = connect(ctx).apps.revisions(name)
    if as_json:
        render.print_json({"revisions": revs})
        return
    rows = [
        [r.get("id"), render.format_time(r.get("created_at")), r.get("env_key"), r.get("message")]
        for r in revs
    ]
    render.print_table(f"Revisions of {name}", ("id", "created", "env", "message"), rows)
