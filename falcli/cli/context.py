"""What every command shares: the global ``--server`` flag, settings, and a ready client.

``connect`` is where the embedded server comes in: with no server configured it makes sure
the background one runs (starting or restarting it) and uses its admin key unless a key was
configured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import typer

from falcli import settings
from falcli.cli import render
from falcli.errors import ConfigError

if TYPE_CHECKING:
    import httpx

    from falcli.client import Client

__all__ = ["CliState", "connect", "load_settings", "state"]


@dataclass
class CliState:
    server: str | None = None
    transport: httpx.BaseTransport | None = None  # test seam: an httpx.MockTransport


def state(ctx: typer.Context) -> CliState:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, CliState) else CliState()


def load_settings(ctx: typer.Context) -> settings.Settings:
    return settings.load(server=state(ctx).server)


def connect(ctx: typer.Context) -> Client:
    """A client for the configured service (the embedded one started when needed)."""
    # httpx costs ~140 ms to import: only commands that talk to the service pay for it.
    from falcli import server_process
    from falcli.client import Client

    cfg = load_settings(ctx)
    if cfg.server_url is not None:
        return Client(cfg.server_url, cfg.key, transport=state(ctx).transport)
    with render.status("Starting the local fal server..."):
        running = server_process.ensure_embedded(cfg.home)
    if running.url is None:
        raise ConfigError(
            f"the embedded server in {cfg.data_dir} reported no URL: "
            "run `fal server stop`, then retry"
        )
    key = cfg.key or server_process.read_admin_key(cfg.data_dir)
    return Client(running.url, key, transport=state(ctx).transport)
