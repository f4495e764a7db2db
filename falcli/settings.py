"""CLI settings: one table, one precedence (flag > env > config file > default).

| setting    | flag         | environment                        | config file  | default         |
|------------|--------------|------------------------------------|--------------|-----------------|
| home       |              | FALCLI_HOME                        |              | ~/.falcli       |
| server url | --server     | FAL_SERVER_URL                     | server_url   | embedded server |
| key        |              | FAL_KEY, or FAL_KEY_ID+_SECRET     | key          | embedded admin  |

"embedded server" is a background ``python -m buildsvc`` the CLI starts on first use;
"embedded admin" is that server's admin key (``<home>/server/admin.key``).

The config file is ``<home>/config.toml``. Besides the user's own ``server_url`` / ``key`` it
holds an ``[embedded]`` table the CLI writes itself (``url``, ``pid``) to find the background
server it started; the embedded server's data lives in ``<home>/server/``.
The file may hold a key, so it is written with mode 0600.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from falcli.errors import ConfigError

__all__ = [
    "EmbeddedRecord",
    "Settings",
    "config_path",
    "embedded_record",
    "forget_embedded",
    "home_dir",
    "key_from_env",
    "load",
    "read_config",
    "record_embedded",
    "server_data_dir",
    "write_config",
]

_CONFIG_NAME = "config.toml"


@dataclass(frozen=True)
class EmbeddedRecord:
    """Where the background server the CLI started last was listening."""

    url: str
    pid: int


@dataclass(frozen=True)
class Settings:
    """Resolved settings. ``server_url`` is None when the embedded server should be used."""

    home: Path
    server_url: str | None
    key: str | None
    server_source: str  # "flag" | "env" | "config" | "embedded": shown by `fal server status`

    @property
    def embedded(self) -> bool:
        return self.server_url is None

    @property
    def data_dir(self) -> Path:
        return server_data_dir(self.home)


def home_dir(env: Mapping[str, str] | None = None) -> Path:
    """``FALCLI_HOME`` or ``~/.falcli``."""
    env = os.environ if env is None else env
    raw = env.get("FALCLI_HOME", "").strip()
    return Path(raw).expanduser() if raw else Path.home() / ".falcli"


def config_path(home: Path) -> Path:
    return home / _CONFIG_NAME


def server_data_dir(home: Path) -> Path:
    return home / "server"


def key_from_env(env: Mapping[str, str]) -> str | None:
    """``FAL_KEY`` (the form fal-client reads) or ``FAL_KEY_ID`` + ``FAL_KEY_SECRET``."""
    key = env.get("FAL_KEY", "").strip()
    if key:
        return key
    key_id, secret = env.get("FAL_KEY_ID", "").strip(), env.get("FAL_KEY_SECRET", "").strip()
    if key_id and secret:
        return f"{key_id}:{secret}"
    if key_id or secret:
        missing = "FAL_KEY_SECRET" if key_id else "FAL_KEY_ID"
        raise ConfigError(
            f"FAL_KEY_ID and FAL_KEY_SECRET must be set together, but {missing} is empty: "
            "set both, or set FAL_KEY=<key_id>:<secret> instead"
        )
    return None


def read_config(home: Path) -> dict[str, Any]:
    """The config file as plain data; {} when it does not exist."""
    path = config_path(home)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    import tomlkit  # lazily: ~15 ms that `fal --help` should not pay

    try:
        return tomlkit.parse(text).unwrap()
    except tomlkit.exceptions.ParseError as exc:
        raise ConfigError(
            f"{path}: not valid TOML ({exc}): fix the file or delete it "
            "(the CLI recreates it on next use)"
        ) from exc


def write_config(home: Path, data: Mapping[str, Any]) -> None:
    """Write the config file atomically with mode 0600 (it may hold a key)."""
    import tomlkit

    home.mkdir(parents=True, exist_ok=True)
    path = config_path(home)
    tmp = path.with_suffix(".toml.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # the mode above applies only to a new file, not a leftover tmp
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(tomlkit.dumps(dict(data)))
    os.replace(tmp, path)


def record_embedded(home: Path, record: EmbeddedRecord) -> None:
    data = read_config(home)
    data["embedded"] = {"url": record.url, "pid": record.pid}
    write_config(home, data)


def forget_embedded(home: Path) -> None:
    data = read_config(home)
    if data.pop("embedded", None) is not None:
        write_config(home, data)


def embedded_record(config: Mapping[str, Any]) -> EmbeddedRecord | None:
    raw = config.get("embedded")
    if not isinstance(raw, Mapping):
        return None
    url, pid = raw.get("url"), raw.get("pid")
    if isinstance(url, str) and isinstance(pid, int):
        return EmbeddedRecord(url=url, pid=pid)
    return None


def _config_str(config: Mapping[str, Any], name: str, home: Path) -> str | None:
    value = config.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"{config_path(home)}: {name} = {value!r}: expected a non-empty string, "
            f'e.g. {name} = "..." (or remove the line)'
        )
    return value.strip()


def _check_url(url: str, origin: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ConfigError(
            f"server url {url!r} (from {origin}): expected an http:// or https:// URL, "
            "e.g. http://127.0.0.1:8080"
        )
    return url.rstrip("/")


def load(
    *, server: str | None = None, env: Mapping[str, str] | None = None, home: Path | None = None
) -> Settings:
    """Resolve every setting: ``server`` is the ``--server`` flag."""
    env = os.environ if env is None else env
    home = home if home is not None else home_dir(env)
    config = read_config(home)
    url, source = _pick(
        ("flag", server), ("env", env.get("FAL_SERVER_URL")), ("config", config.get("server_url"))
    )
    if url is not None:
        url = _check_url(url, {"flag": "--server", "env": "FAL_SERVER_URL"}.get(source, "config"))
    key = key_from_env(env) or _config_str(config, "key", home)
    return Settings(home=home, server_url=url, key=key, server_source=source)


def _pick(*candidates: tuple[str, Any]) -> tuple[str | None, str]:
    for source, value in candidates:
        if isinstance(value, str) and value.strip():
            return value.strip(), source
    return None, "embedded"
