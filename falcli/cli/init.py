"""`fal init [NAME]` and `fal create app NAME`: write a starter app into this project."""

from __future__ import annotations

import re
from pathlib import Path

import typer

__all__ = ["create_app_cmd", "create_app", "init"]

create_app = typer.Typer(help="Create things from templates.", no_args_is_help=True)

_TEMPLATE = typer.Option("basic", "--template", "-t", help="starter template to use")
_FORCE = typer.Option(False, "--force", help="overwrite files that exist")


def init(
    name: str | None = typer.Argument(None, help="app name (default: this directory's name)"),
    template: str = _TEMPLATE,
    force: bool = _FORCE,
) -> None:
    """Start a project here: a starter app listed in pyproject.toml."""
    root = Path.cwd()
    _create(root, name or _default_name(root), template, force)


@create_app.command("app")
def create_app_cmd(
    name: str = typer.Argument(..., help="app name (the [tool.fal.apps] key)"),
    template: str = _TEMPLATE,
    force: bool = _FORCE,
) -> None:
    """Add an app from a template to this project."""
    _create(Path.cwd(), name, template, force)


def _default_name(root: Path) -> str:
    """This directory's name as an app key: ``My_Project`` -> ``my-project``."""
    return re.sub(r"[^a-z0-9]+", "-", root.name.lower()).strip("-") or "my-app"


def _create(root: Path, name: str, template: str, force: bool) -> None:
    from falcli.scaffold import create_app as scaffold_create

    created = scaffold_create(root, name, template, force=force)
    typer.echo(f"Created app {created.name} ({created.ref}) from template {template!r}:")
    for path in created.files:
        typer.echo(f"  {path.relative_to(root) if path.is_relative_to(root) else path}")
    typer.echo(f"Next: fal run {created.name}")
