"""The `fal` command: the typer app, its nouns, and ``main`` (the console script).

Commands live one noun per module; this module only wires them. ``rich_markup_mode=None``
keeps rich off the ``--help`` path (typer would import it to render help), which keeps
``fal --help`` fast; rich is imported lazily by ``falcli.cli.render`` when output needs it.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import typer

from falcli import __version__
from falcli.cli.apps import apps_app
from falcli.cli.context import CliState
from falcli.cli.deploy import deploy
from falcli.cli.errors import EXIT_CODES_HELP, run_guarded
from falcli.cli.init import create_app, init
from falcli.cli.keys import keys_app
from falcli.cli.logs import logs
from falcli.cli.run import run
from falcli.cli.runners import runners_app
from falcli.cli.server import server_app

if TYPE_CHECKING:
    import httpx

__all__ = ["app", "main", "run_cli"]

app = typer.Typer(
    name="fal",
    help="Build, run and deploy fal apps on your own server.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fal (falcli) {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    server: str | None = typer.Option(
        None, "--server", help="service URL (env FAL_SERVER_URL; default: a local background one)"
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the version"
    ),
) -> None:
    seam = ctx.obj.transport if isinstance(ctx.obj, CliState) else None
    ctx.obj = CliState(server=server, transport=seam)


app.command("run")(run)
app.command("deploy")(deploy)
app.command("init")(init)
app.command("logs")(logs)
app.add_typer(apps_app, name="apps")
app.add_typer(runners_app, name="runners")
app.add_typer(keys_app, name="keys")
app.add_typer(server_app, name="server")
app.add_typer(create_app, name="create")


def run_cli(argv: list[str] | None = None, *, transport: httpx.BaseTransport | None = None) -> int:
    """Run the CLI on ``argv`` (default: sys.argv) and return the exit code.

    ``transport`` is the test seam handed to every ``Client`` the commands make.
    """
    args = sys.argv[1:] if argv is None else argv
    obj = CliState(transport=transport)
    return run_guarded(lambda: app(args=args, prog_name="fal", standalone_mode=False, obj=obj))


def main() -> None:
    """Console script entry point: the only place the process exits."""
    # Optional imports of our libraries that the CLI never uses: httpcore imports trio when
    # it is installed (~200 ms) and httpx its own command line, with click and rich (~50 ms).
    # An entry of None in sys.modules makes such an optional import fail fast instead.
    for unused in ("trio", "httpx._main"):
        sys.modules.setdefault(unused, None)  # type: ignore[arg-type]
    sys.exit(run_cli())
