"""``python -m buildsvc``: serve the service with uvicorn (uvloop + httptools).

It binds the socket itself so ``--port 0`` works, and once the server listens (lifespan done,
admin key written) it writes ``--ready-file`` atomically as JSON ``{"url", "pid",
"admin_key_file", "version"}``: the CLI's background autostart and the tests wait for that
file. SIGTERM / SIGINT stop it gracefully (runners included). This entry point, like the CLI,
is allowed to print and exit; the library underneath never does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

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
    p.add_argument("--runtime", default="local", choices=["local", "docker"],
                   help="run runners as local processes or as Docker containers")
    p.add_argument("--docker-cpu-base", default="fal-base-cpu:bookworm",
                   help="base image of generated Dockerfiles for CPU machine types")
    p.add_argument("--docker-gpu-base", default="fal-base-gpu:bookworm",
                   help="base image of generated Dockerfiles for GPU machine types")
    p.add_argument("--registry", help="push built images to this registry (host[:port][/path])")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _add_limit_flags(p)
    return p.parse_args(argv)


def _add_limit_flags(p: argparse.ArgumentParser) -> None:
    """Limits at the door (docs/service.md); defaults are ServerConfig's."""
    d = ServerConfig(data_dir=Path("."))
    # fmt: off
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help="largest request body, sync or queued (413 above)")
    p.add_argument("--header-timeout", type=float, default=d.header_timeout,
                   help="seconds a client has to send a request's headers (then dropped)")
    p.add_argument("--rate-limit", type=float, default=d.rate_limit,
                   help="requests per second per key or client address (0: off)")
    p.add_argument("--rate-burst", type=int, default=d.rate_burst,
                   help="requests a caller may send at once before --rate-limit applies")
    p.add_argument("--max-queue-depth", type=int, default=d.max_queue_depth,
                   help="unfinished queued requests per app (429 above; 0: no cap)")
    # fmt: on


def _limits(args: argparse.Namespace) -> dict[str, Any]:
    names = ("max_body_bytes", "header_timeout", "rate_limit", "rate_burst", "max_queue_depth")
    return {name: getattr(args, name) for name in names}


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
        runtime=args.runtime,
        docker_cpu_base=args.docker_cpu_base,
        docker_gpu_base=args.docker_gpu_base,
        registry=args.registry,
        **_limits(args),
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


def _header_deadline(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol plus a deadline for each request's headers, from the
    connection (or a request's first byte) to the end of its headers. uvicorn's keep-alive
    timer stops at a request's first byte, so without this a client trickling its headers
    byte by byte holds a connection forever (slowloris); other clients are unaffected."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class _Protocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return _Protocol


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
            http=_header_deadline(config.header_timeout),
            lifespan="on",
            ssl_certfile=config.tls_cert,
            ssl_keyfile=config.tls_key,
            access_log=False,
            proxy_headers=False,  # no trusted proxy in front by default; saves a middleware hop
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
