"""``python -m buildsvc``: serve the service with uvicorn (uvloop + httptools).

It binds the socket itself so ``--port 0`` works, and once the server listens (lifespan done,
admin key written) it writes ``--ready-file`` atomically as JSON ``{"url", "pid",
"admin_key_file", "version"}``: the CLI's background autostart and the tests wait for that
file. SIGTERM / SIGINT stop it gracefully (runners included). This entry point, like the CLI,
is allowed to print and exit; the library underneath never does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path

import uvicorn

from buildsvc import __version__
from buildsvc.app import ServiceApp, create_app
from buildsvc.config import ConfigError, ServerConfig

__all__ = ["main"]

_GRACEFUL_S = 5  # open streams (log follows) get this long before shutdown closes them


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m buildsvc", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=0, help="port (0: any free port)")
    p.add_argument("--data-dir", type=Path, default=Path.home() / ".falcli" / "server")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate (with --tls-key: serve https)")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument("--emulate-gpus", type=int, default=0, help="pretend to have N GPUs")
    p.add_argument("--ready-file", type=Path, help="write {url, pid, ...} here once listening")
    p.add_argument("--owner", help="owner of the admin key made on first start")
    p.add_argument("--public-url", help="base URL clients use, when behind a proxy")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def _config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        data_dir=args.data_dir,
        host=args.host,
        port=args.port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        emulate_gpus=args.emulate_gpus,
        public_url=args.public_url,
        owner=args.owner,
    ).validate()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror}): pick another --port "
            "(0 picks a free one) or stop what uses it"
        ) from exc
    sock.set_inheritable(False)  # runners must not hold the listening socket open
    return sock


def _write_ready(path: Path, payload: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


class _Server(uvicorn.Server):
    """uvicorn's server, plus the ready file once it listens."""

    def __init__(
        self, app: ServiceApp, config: uvicorn.Config, *, ready: Path | None,
        info: dict[str, object],
    ) -> None:  # fmt: skip
        super().__init__(config)
        self._app = app
        self._ready = ready
        self._info = info

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self._ready is not None:
            assert self._app.components is not None
            self._info["admin_key_file"] = self._app.components.admin_key_file
            _write_ready(self._ready, self._info)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = _config(args)
        sock = _bind(config.host, config.port)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config.port = sock.getsockname()[1]
    app = create_app(config)
    server = _Server(
        app,
        uvicorn.Config(
            app,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            ssl_certfile=config.tls_cert,
            ssl_keyfile=config.tls_key,
            access_log=False,
            log_level=args.log_level,
            timeout_graceful_shutdown=_GRACEFUL_S,
            log_config=None,
        ),
        ready=args.ready_file,
        info={"url": config.listen_url(), "pid": os.getpid(), "version": __version__},
    )
    server.run(sockets=[sock])
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(main())
