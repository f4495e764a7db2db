"""ServerConfig: every setting the service runs with, validated once at startup.

``python -m buildsvc`` and ``fal server start`` take the same options and build this record;
everything else in the service reads it and never looks at flags or the environment itself.

    ConfigError(ValueError)   a setting is wrong; the message names it, the value and the fix
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DEFAULT_MAX_UPLOAD_BYTES", "ConfigError", "ServerConfig"]

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024**3  # one blob upload (uncompressed), 10 GiB


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
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_upload_members: int = 100_000
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


def _check_int(name: str, value: object, low: int, high: int, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(
            f"{name} = {value!r}: expected an integer from {low} to {high}, e.g. {example}"
        )
