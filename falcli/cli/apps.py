"""`fal apps list | delete | revisions`."""

from __future__ import annotations

import typer

from falcli.cli import render
from falcli.cli.context import connect

__all__ = ["apps_app"]

apps_app = typer.Typer(help="List, inspect and delete apps.", no_args_is_help=True)

_JSON = typer.Option(False, "--json", help="print JSON instead of a table")


@apps_app.command("list")
def list_apps(ctx: typer.Context, as_json: bool = _JSON) -> None:
    """List the apps you can see."""
    apps = connect(ctx).apps.list()
    if as_json:
        render.print_json({"apps": apps})
        return
    columns = ("name", "owner", "auth", "revision", "ephemeral", "runners", "url")
    rows = [[a.get(c) for c in columns] for a in apps]
    render.print_table("Apps", columns, rows)


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
