"""`fal logs APP [--follow]`."""

from __future__ import annotations

import typer

from falcli.cli import render
from falcli.cli.context import connect

__all__ = ["logs"]


def logs(
    ctx: typer.Context,
    app: str = typer.Argument(..., help="app name"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep streaming new lines"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
) -> None:
    """Print an app's logs."""
    import json

    for record in connect(ctx).apps.logs(app, follow=follow):
        if as_json:
            typer.echo(json.dumps(record, sort_keys=True))
            continue
        stamp = render.format_time(record.get("timestamp"))
        source = record.get("source") or "-"
        typer.echo(
            f"{stamp} {str(record.get('level', '')).upper():5} {source}: "
            f"{record.get('message', '')}"
        )
