"""The embedded background server: start it detached, find it again, check it, stop it.

With no server configured the CLI runs ``python -m buildsvc`` in its own session (so it
outlives the command and ignores the terminal's Ctrl-C), waits for the ready file the service
writes once it listens, and records ``url`` / ``pid`` in ``<home>/config.toml``. A recorded
server that is gone (pid dead or health failing) is started again. A file lock keeps two
concurrent CLI commands from starting two servers.

``falcli`` never imports ``buildsvc``: the service is only ever a child process here.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from falcli import settings as _settings
from falcli.errors import ServiceUnavailable

__all__ = [
    "ServerStatus",
    "ensure_embedded",
    "foreground_argv",
    "log_path",
    "probe_version",
    "read_admin_key",
    "start_background",
    "status_embedded",
    "stop_embedded",
]

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 15.0
_LOG_TAIL_LINES = 30


@dataclass(frozen=True)
class ServerStatus:
    url: str | None
    pid: int | None
    version: str | None
    up: bool


def log_path(home: Path) -> Path:
    return _settings.server_data_dir(home) / "server.log"


def _ready_path(home: Path) -> Path:
    return _settings.server_data_dir(home) / "ready.json"


def read_admin_key(data_dir: Path) -> str:
    """The ``<key_id>:<secret>`` admin key the service wrote into its data dir."""
    path = data_dir / "admin.key"
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError as exc:
        raise ServiceUnavailable(
            f"admin key file {path} does not exist: the embedded server has not initialised "
            "its data dir; run `fal server stop` then retry, or set FAL_KEY"
        ) from exc


def foreground_argv(
    *,
    host: str,
    port: int,
    data_dir: Path,
    ready_file: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    emulate_gpus: int | None = None,
) -> list[str]:
    """The ``python -m buildsvc`` command line for these options."""
    argv = [sys.executable, "-m", "buildsvc", "--host", host, "--port", str(port)]
    argv += ["--data-dir", str(data_dir)]
    if ready_file is not None:
        argv += ["--ready-file", str(ready_file)]
    if tls_cert is not None and tls_key is not None:
        argv += ["--tls-cert", str(tls_cert), "--tls-key", str(tls_key)]
    if emulate_gpus is not None:
        argv += ["--emulate-gpus", str(emulate_gpus)]
    return argv


def probe_version(url: str, timeout: float = 2.0) -> str | None:
    """The version ``url``'s ``/v1/health`` reports, or None when it does not answer."""
    if url.startswith("http://"):
        return _probe_plain(url, timeout)
    try:
        resp = httpx.get(f"{url}/v1/health", timeout=timeout)
        return str(resp.json().get("version", "")) if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


def _probe_plain(url: str, timeout: float) -> str | None:
    # The embedded server is plain http on loopback; http.client answers in ~1 ms where a
    # new httpx client costs ~50 ms (it builds a TLS context) on every CLI command.
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path.rstrip("/") + "/v1/health")
        resp = conn.getresponse()
        body = json.loads(resp.read()) if resp.status == 200 else None
        return str(body.get("version", "")) if isinstance(body, dict) else None
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _pid_alive(pid: int) -> bool:
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _reap(pid: int) -> None:
    # When this process started the server (tests, long-lived callers) a dead server stays a
    # zombie that `kill(pid, 0)` still finds; reaping it makes the pid check honest.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _is_buildsvc(pid: int) -> bool:
    """Guard against signalling a recycled pid: the process must be our service."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the recorded pid
    return b"buildsvc" in cmdline


@contextmanager
def _start_lock(home: Path) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "server.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def status_embedded(home: Path) -> ServerStatus:
    """What the config file records about the embedded server, and whether it answers."""
    record = _settings.embedded_record(_settings.read_config(home))
    if record is None:
        return ServerStatus(url=None, pid=None, version=None, up=False)
    version = probe_version(record.url) if _pid_alive(record.pid) else None
    return ServerStatus(url=record.url, pid=record.pid, version=version, up=version is not None)


def ensure_embedded(home: Path, *, timeout: float = _START_TIMEOUT) -> ServerStatus:
    """The running embedded server, started (or restarted) when needed."""
    current = status_embedded(home)
    if current.up:
        return current
    with _start_lock(home):
        current = status_embedded(home)  # another command may have started it meanwhile
        if current.up:
            return current
        if current.pid is not None and _pid_alive(current.pid) and _is_buildsvc(current.pid):
            _terminate(current.pid, _STOP_TIMEOUT)  # alive but not answering: replace it
        return start_background(home, timeout=timeout)


def start_background(home: Path, *, timeout: float = _START_TIMEOUT) -> ServerStatus:
    """Start ``python -m buildsvc`` detached and wait (up to ``timeout``) until it is ready."""
    data_dir = _settings.server_data_dir(home)
    data_dir.mkdir(parents=True, exist_ok=True)
    ready = _ready_path(home)
    ready.unlink(missing_ok=True)
    argv = foreground_argv(host="127.0.0.1", port=0, data_dir=data_dir, ready_file=ready)
    with open(log_path(home), "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the CLI and the terminal's SIGINT
            close_fds=True,
        )
    info = _wait_ready(proc, ready, home, timeout)
    status = ServerStatus(
        url=str(info["url"]).rstrip("/"),
        pid=int(info.get("pid") or proc.pid),
        version=str(info.get("version", "")),
        up=True,
    )
    assert status.url is not None and status.pid is not None
    _settings.record_embedded(home, _settings.EmbeddedRecord(url=status.url, pid=status.pid))
    return status


def _wait_ready(
    proc: subprocess.Popen[bytes], ready: Path, home: Path, timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _read_ready(ready)
        if info is not None:
            return info
        if proc.poll() is not None:
            raise ServiceUnavailable(
                f"the embedded server exited with code {proc.returncode} before it was ready; "
                f"fix the cause shown in its log ({log_path(home)}), then retry:\n"
                + _log_tail(home)
            )
        time.sleep(0.05)
    _terminate(proc.pid, 5.0)
    raise ServiceUnavailable(
        f"the embedded server did not become ready within {timeout:.0f}s (no {ready}); "
        f"see its log ({log_path(home)}) or start one with `fal server start`:\n" + _log_tail(home)
    )


def _read_ready(ready: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(ready.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None  # not written yet, or half-written
    return data if isinstance(data, dict) and "url" in data else None


def _log_tail(home: Path) -> str:
    try:
        lines = log_path(home).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-_LOG_TAIL_LINES:])


def stop_embedded(home: Path, *, timeout: float = _STOP_TIMEOUT) -> ServerStatus | None:
    """Stop the recorded embedded server; None when there was none running."""
    with _start_lock(home):
        current = status_embedded(home)
        _settings.forget_embedded(home)
        if current.pid is None or not _pid_alive(current.pid) or not _is_buildsvc(current.pid):
            return None
        _terminate(current.pid, timeout)
        return current


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM the server's process group, wait for it, SIGKILL after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        _signal_group(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return
            time.sleep(0.05)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # the server leads its own session: reach its runners too
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
