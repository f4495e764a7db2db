"""`fal runners list`."""

from __future__ import annotations

import typer

from falcli.cli import render
from falcli.cli.context import connect

__all__ = ["runners_app"]

runners_app = typer.Typer(help="Inspect runner processes.", no_args_is_help=True)


@runners_app.command("list")
def list_runners(
    ctx: typer.Context,
    app: str | None = typer.Option(None, "--app", help="only the runners of this app"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """List runners and their states."""
    runners = connect(ctx).runners.list(app)
    if as_json:
        render.print_json({"runners": runners})
        return
    columns = ("id", "app", "revision", "state", "pid", "in_flight", "started")
    rows = [
        [
            r.get("id"),
            r.get("app"),
            r.get("revision"),
            r.get("state"),
            r.get("pid"),
            r.get("in_flight"),
            render.format_time(r.get("started_at")),
        ]
        for r in runners
    ]
    render.print_table("Runners", columns, rows)
