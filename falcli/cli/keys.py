"""`fal keys create | list | revoke`."""

from __future__ import annotations

import typer

from falcli.cli import render
from falcli.cli.context import connect

__all__ = ["keys_app"]

keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)


@keys_app.command("create")
def create(
    ctx: typer.Context,
    owner: str | None = typer.Option(None, "--owner", help="owner of the key (admin only)"),
    name: str | None = typer.Option(None, "--name", help="a label for the key"),
    admin: bool = typer.Option(False, "--admin", help="an admin key (admin only)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Create a key. The secret is shown once: store it (e.g. as FAL_KEY)."""
    created = connect(ctx).keys.create(owner=owner, name=name, admin=admin)
    if as_json:
        render.print_json(created)
        return
    render.print_kv(
        [
            ("key_id", created.get("key_id")),
            ("owner", created.get("owner")),
            ("key", created.get("key")),
        ]
    )
    render.print_warning("the secret is shown only once: export FAL_KEY=<key> to use it")


@keys_app.command("list")
def list_keys(
    ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="print JSON")
) -> None:
    """List keys (never their secrets)."""
    keys = connect(ctx).keys.list()
    if as_json:
        render.print_json({"keys": keys})
        return
    columns = ("key_id", "owner", "name", "admin", "revoked", "created")
    rows = [
        [
            k.get("key_id"),
            k.get("owner"),
            k.get("name"),
            k.get("admin"),
            k.get("revoked"),
            render.format_time(k.get("created_at")),
        ]
        for k in keys
    ]
    render.print_table("Keys", columns, rows)


@keys_app.command("revoke")
def revoke(ctx: typer.Context, key_id: str = typer.Argument(..., help="the key's id")) -> None:
    """Revoke a key: requests with it are refused from now on."""
    connect(ctx).keys.revoke(key_id)
    typer.echo(f"Revoked key {key_id}")
