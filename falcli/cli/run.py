"""`fal run`: deploy an ephemeral app, print its URLs, stream its logs, delete it on exit.

Ctrl-C (SIGINT) and SIGTERM both end the log stream; the ephemeral app is then deleted (its
runners stop) and the command exits 0. A failing build or ``setup()`` exits 3 with the detail.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

import typer

from falcli.cli import render
from falcli.cli.context import connect
from falcli.cli.ship import build_bundle, ship
from falcli.errors import ClientError, NotFoundError, ServiceUnavailable

if TYPE_CHECKING:
    from falcli.client import BundleLike, Client, DeployEvent

__all__ = ["run"]


class _Stop(BaseException):
    """Raised from the signal handler to leave the log stream (like KeyboardInterrupt)."""


def run(
    ctx: typer.Context,
    ref: str | None = typer.Argument(
        None, metavar="REF|APP_KEY", help="path/to/file.py::Class or a [tool.fal.apps] key"
    ),
    auth: str | None = typer.Option(
        None, "--auth", help="private, public or shared (default for run: public)"
    ),
    app_name: str | None = typer.Option(None, "--app-name", help="name of the ephemeral app"),
    no_cache: bool = typer.Option(False, "--no-cache", help="rebuild the environment"),
) -> None:
    """Run an app ephemerally until Ctrl-C, streaming its logs."""
    bundle = build_bundle(ref, {"auth": auth or "public", "app_name": app_name})
    client = connect(ctx)
    name = str(bundle.manifest.get("app_name", ""))
    running = False
    with _stop_on_signals():
        try:
            done = _ship_ephemeral(client, bundle, auth or "public", no_cache, app_name is None)
            name = str((done.get("app") or {}).get("name") or name)
            running = True
            _print_urls(done)
            _follow_logs(client, name)
        except (_Stop, KeyboardInterrupt):
            if not running:  # stopped before it ran: report the interruption (exit 130)
                raise KeyboardInterrupt from None
        finally:
            _delete_ephemeral(client, name)


def _ship_ephemeral(
    client: Client, bundle: BundleLike, auth: str, no_cache: bool, may_rename: bool
) -> DeployEvent:
    """Ship as an ephemeral app; beside a deployed app of the same name, run as NAME-run."""
    try:
        return ship(client, bundle, auth=auth, ephemeral=True, no_cache=no_cache)
    except ClientError as exc:
        if not may_rename or exc.error_type != "app_conflict":
            raise
    name = f"{bundle.manifest.get('app_name', 'app')}-run"
    render.print_warning(f"a deployed app has this name: running this one as {name!r}")
    return ship(client, bundle, auth=auth, ephemeral=True, no_cache=no_cache, app_name=name)


def _print_urls(done: DeployEvent) -> None:
    urls = done.get("urls") or {}
    app = done.get("app") or {}
    rows = [
        (label, str(urls[key]))
        for key, label in (("sync", "sync"), ("queue", "queue"))
        if urls.get(key)
    ]
    render.print_urls(f"{app.get('name', 'app')} is running (Ctrl-C to stop)", rows)


def _follow_logs(client: Client, name: str) -> None:
    try:
        for record in client.apps.logs(name, follow=True):
            render.print_log(_log_line(record), stderr=False)
    except ServiceUnavailable:
        raise
    except ClientError as exc:
        render.print_warning(f"cannot stream logs of {name!r} ({exc}); waiting for Ctrl-C")
    while True:  # the stream ended (or is unsupported): keep the app up until a signal
        signal.pause()


def _log_line(record: dict[str, object]) -> str:
    runner = str(record.get("runner_id") or "")[:8]
    prefix = f"[{runner}] " if runner else ""
    return f"{prefix}{record.get('message', '')}"


def _delete_ephemeral(client: Client, name: str) -> None:
    """Delete the app when it is ours: ephemeral (never a deployed app of the same name)."""
    with _signals_ignored():
        try:
            if client.apps.get(name).get("ephemeral"):
                client.apps.delete(name)
        except NotFoundError:
            pass
        except ClientError as exc:
            render.print_warning(f"could not delete the ephemeral app {name!r}: {exc}")


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signum)


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    # A second Ctrl-C during cleanup would leave the app (and its runners) behind.
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
