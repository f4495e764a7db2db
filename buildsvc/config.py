"""ServerConfig: every setting the service runs with, validated once at startup.

``python -m buildsvc`` and ``fal server start`` take the same options and build this record;
everything else in the service reads it and never looks at flags or the environment itself.

    ConfigError(ValueError)   a setting is wrong; the message names it, the value and the fix
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DEFAULT_MAX_UPLOAD_BYTES", "RUNTIMES", "ConfigError", "ServerConfig"]

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024**3  # one blob upload (uncompressed), 10 GiB
DEFAULT_MAX_BODY_BYTES = 64 * 1024**2  # one call's body through the gateway or the queue
RUNTIMES = ("local", "docker")  # runners as local processes, or as containers


class ConfigError(ValueError):
    """A server setting is invalid."""


@dataclass
class ServerConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 0  # 0: the OS picks a free port; the ready file says which
    tls_cert: Path | None = None
    tls_key: Path | None = None
    emulate_gpus: int = 0
    public_url: str | None = None  # base of the URLs the API hands out, when behind a proxy
    owner: str | None = None  # owner of the admin key made on first start
    # limits at the door (docs/service.md, "Limits"): gateway and queue alike
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # one request body; larger ones get 413
    header_timeout: float = 10.0  # seconds a client has to send a request's headers
    rate_limit: float = 0.0  # requests per second per key (or client address); 0: off
    rate_burst: int = 50  # requests a caller may send at once before rate_limit applies
    max_queue_depth: int = 100_000  # unfinished queued requests per app; more get 429
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_upload_members: int = 100_000
    runtime: str = "local"  # "docker": every app runs in an image (image apps always do)
    docker_cpu_base: str = "fal-base-cpu:bookworm"  # base images of generated Dockerfiles
    docker_gpu_base: str = "fal-base-gpu:bookworm"
    registry: str | None = None  # push built images there (host[:port][/path]), if set
    extra: dict[str, str] = field(default_factory=dict)  # free-form knobs for other parts

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def validate(self) -> ServerConfig:
        """Check every setting, create ``data_dir``; return self so calls can chain."""
        self.data_dir = _ensure_data_dir(self.data_dir)
        _check_tls(self.tls_cert, self.tls_key)
        _check_int("port", self.port, 0, 65535, "--port 8080 (or 0 for any free port)")
        _check_int("emulate_gpus", self.emulate_gpus, 0, 64, "--emulate-gpus 2")
        _check_int("max_upload_bytes", self.max_upload_bytes, 1, 2**50, "10737418240")
        _check_int("max_upload_members", self.max_upload_members, 1, 10**7, "100000")
        _check_limits(self)
        _check_docker(self)
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"public_url = {self.public_url!r}: expected an http(s) URL, "
                "e.g. --public-url https://fal.example.com"
            )
        return self

    def listen_url(self) -> str:
        """The URL of the address bound (after a port-0 bind, ``port`` holds the real one)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
        return f"{self.scheme}://{host}:{self.port}"

    def base_url(self) -> str:
        """The URL clients use: ``public_url`` if set, else the address bound."""
        return self.public_url.rstrip("/") if self.public_url else self.listen_url()


def _ensure_data_dir(data_dir: Path) -> Path:
    path = Path(data_dir).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)  # it holds keys and the db
    except OSError as exc:
        raise ConfigError(
            f"data_dir {str(path)!r} cannot be created ({exc.strerror}): "
            "pass a writable directory, e.g. --data-dir ~/.falcli/server"
        ) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(
            f"data_dir {str(path)!r} is not writable: fix its permissions or pass another "
            "--data-dir"
        )
    return path


def _check_tls(cert: Path | None, key: Path | None) -> None:
    if (cert is None) != (key is None):
        given, missing = ("--tls-cert", "--tls-key") if key is None else ("--tls-key", "--tls-cert")
        raise ConfigError(
            f"TLS needs both a certificate and a key: {given} was given without {missing}; "
            "pass both, e.g. --tls-cert cert.pem --tls-key key.pem"
        )
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(
                f"{flag} {str(path)!r}: file does not exist or is not readable; "
                "pass a readable PEM file"
            )


def _check_docker(cfg: ServerConfig) -> None:
    if cfg.runtime not in RUNTIMES:
        raise ConfigError(
            f"runtime = {cfg.runtime!r}: expected one of {', '.join(RUNTIMES)}, "
            "e.g. --runtime docker"
        )
    for name in ("docker_cpu_base", "docker_gpu_base"):
        value = getattr(cfg, name)
        if not isinstance(value, str) or not value.strip() or " " in value:
            raise ConfigError(
                f"{name} = {value!r}: expected an image reference, e.g. "
                f"--{name.replace('_', '-')} fal-base-cpu:bookworm"
            )
    registry = cfg.registry
    if registry is not None and (not registry or "://" in registry or " " in registry):
        raise ConfigError(
            f"registry = {registry!r}: expected host[:port][/path] without a scheme, "
            "e.g. --registry registry.example.com:5000/fal"
        )


def _check_limits(cfg: ServerConfig) -> None:
    _check_int("max_body_bytes", cfg.max_body_bytes, 1, 2**40, "--max-body-bytes 67108864")
    _check_int("rate_burst", cfg.rate_burst, 1, 10**6, "--rate-burst 50")
    _check_int("max_queue_depth", cfg.max_queue_depth, 0, 10**9,
               "--max-queue-depth 100000 (0: no cap)")  # fmt: skip
    for name, value, example in (
        ("header_timeout", cfg.header_timeout, "--header-timeout 10"),
        ("rate_limit", cfg.rate_limit, "--rate-limit 20 (0: off)"),
    ):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ConfigError(f"{name} = {value!r}: expected a number >= 0, e.g. {example}")
    if cfg.header_timeout == 0:
        raise ConfigError("header_timeout = 0: expected a number of seconds > 0, "
                          "e.g. --header-timeout 10")  # fmt: skip


def _check_int(name: str, value: object, low: int, high: int, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(
            f"{name} = {value!r}: expected an integer from {low} to {high}, e.g. {example}"
        )
