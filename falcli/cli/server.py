"""`fal server start | status | stop`.

``start`` runs the service in the foreground (Ctrl-C stops it). When it uses the default data
dir it is recorded like the embedded server, so other commands use it meanwhile.
``status`` exits 0 when the server answers and 3 when it does not.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import typer

from falcli import settings
from falcli.cli import render
from falcli.cli.context import load_settings
from falcli.cli.errors import EXIT_FAILURE
from falcli.errors import ConfigError

__all__ = ["server_app"]

server_app = typer.Typer(help="Run and manage the local fal server.", no_args_is_help=True)


@server_app.command("start")
def start(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    port: int = typer.Option(8080, "--port", help="port to listen on (0: any free port)"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="default: <home>/server"),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="PEM certificate (https)"),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="PEM private key (https)"),
    emulate_gpus: int | None = typer.Option(None, "--emulate-gpus", help="pretend N GPUs"),
    runtime: str = typer.Option(
        "local", "--runtime", help="runners as 'local' processes or 'docker' containers"
    ),
    registry: str | None = typer.Option(None, "--registry", help="push built images there"),
    max_body_bytes: int | None = typer.Option(
        None, "--max-body-bytes", help="largest request body, sync or queued (413 above)"
    ),
    header_timeout: float | None = typer.Option(
        None, "--header-timeout", help="seconds a client has to send a request's headers"
    ),
    rate_limit: float | None = typer.Option(
        None, "--rate-limit", help="requests per second per key or client address (0: off)"
    ),
    rate_burst: int | None = typer.Option(
        None, "--rate-burst", help="requests a caller may send at once before --rate-limit"
    ),
    max_queue_depth: int | None = typer.Option(
        None, "--max-queue-depth", help="unfinished queued requests per app (429 above; 0: no cap)"
    ),
) -> None:
    """Run the server in the foreground until Ctrl-C."""
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together: pass both (PEM files) or neither")
    if runtime not in ("local", "docker"):
        raise ConfigError(
            f"--runtime {runtime!r}: expected 'local' or 'docker', e.g. --runtime docker"
        )
    home = load_settings(ctx).home
    default_dir = settings.server_data_dir(home)
    data_dir = data_dir or default_dir
    ready = data_dir / "ready.json"
    ready.unlink(missing_ok=True)
    from falcli import server_process

    argv = server_process.foreground_argv(
        host=host,
        port=port,
        data_dir=data_dir,
        ready_file=ready,
        tls_cert=tls_cert,
        tls_key=tls_key,
        emulate_gpus=emulate_gpus,
    )
    argv += ["--runtime", runtime] + (["--registry", registry] if registry else [])
    argv += _limit_args(max_body_bytes=max_body_bytes, header_timeout=header_timeout,
                        rate_limit=rate_limit, rate_burst=rate_burst,
                        max_queue_depth=max_queue_depth)  # fmt: skip
    proc = subprocess.Popen(argv)  # same process group: the terminal's Ctrl-C reaches it
    try:
        code = _serve(proc, ready, record_in=home if data_dir == default_dir else None)
    except KeyboardInterrupt:
        code = _wait_or_kill(proc)
    raise typer.Exit(code)


def _limit_args(**limits: float | None) -> list[str]:
    """The service's limit flags that were given; the others keep the service's defaults."""
    argv: list[str] = []
    for name, value in limits.items():
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def _serve(proc: subprocess.Popen[bytes], ready: Path, record_in: Path | None) -> int:
    """Wait for the ready file, record the server, then wait for it to exit."""
    while proc.poll() is None and not ready.exists():
        time.sleep(0.05)
    if proc.poll() is None and record_in is not None:
        info = _read_json(ready)
        if info.get("url"):
            settings.record_embedded(
                record_in, settings.EmbeddedRecord(url=str(info["url"]), pid=proc.pid)
            )
    try:
        return proc.wait()
    finally:
        if record_in is not None:
            settings.forget_embedded(record_in)


def _read_json(path: Path) -> dict[str, object]:
    import json

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the file may be mid-write
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except ValueError:
            time.sleep(0.05)
    return {}


def _wait_or_kill(proc: subprocess.Popen[bytes]) -> int:
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return 0


@server_app.command("status")
def status(
    ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="print JSON")
) -> None:
    """Show the server's URL, pid, version and whether it is up."""
    from falcli import server_process

    cfg = load_settings(ctx)
    if cfg.server_url is not None:
        version = server_process.probe_version(cfg.server_url, timeout=5.0)
        current = server_process.ServerStatus(
            url=cfg.server_url, pid=None, version=version, up=version is not None
        )
    else:
        current = server_process.status_embedded(cfg.home)
    data = {
        "url": current.url,
        "pid": current.pid,
        "version": current.version,
        "up": current.up,
        "source": cfg.server_source,
    }
    if as_json:
        render.print_json(data)
    else:
        render.print_kv([(k, ("up" if v else "down") if k == "up" else v) for k, v in data.items()])
    if not current.up:
        raise typer.Exit(EXIT_FAILURE)


@server_app.command("stop")
def stop(ctx: typer.Context) -> None:
    """Stop the background server the CLI started."""
    from falcli import server_process

    cfg = load_settings(ctx)
    if not cfg.embedded:
        raise ConfigError(
            f"the server in use is {cfg.server_url} (from {cfg.server_source}), which the CLI "
            "did not start: stop it where it runs, or unset --server / FAL_SERVER_URL"
        )
    stopped = server_process.stop_embedded(cfg.home)
    if stopped is None:
        typer.echo("No local server was running.")
    else:
        typer.echo(f"Stopped the local server (pid {stopped.pid}, {stopped.url}).")
