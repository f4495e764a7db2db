"""The log hub: every log line of the service, per app, in memory and on disk.

Runners (their stdout/stderr), builds, the gateway and the service itself emit
``LogRecord``s here. The hub keeps a ring of recent records per ``(owner, app)`` for
``recent()``, fans them out to live ``follow()`` subscribers, and appends them as JSON lines
to ``<data_dir>/logs/<owner>/<app>.jsonl`` so they survive a restart.

``emit`` never blocks on a reader: each follower has a bounded queue and a slow follower
loses its oldest records, not the emitter's time. Disk writes are batched (a short timer on
the running loop) so a chatty runner costs one ``write`` per batch, not per line.

Secrets: values registered with ``add_secret`` and anything shaped like an
``Authorization: Key ...`` credential are masked before a record is stored anywhere.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["LogHub", "LogRecord"]

_FLUSH_DELAY = 0.25  # seconds: batch disk appends, yet lose little on a crash
_FOLLOW_QUEUE = 1000  # records a follower may lag behind before it loses the oldest
_TAIL_BYTES = 4 * 1024 * 1024  # how much of a log file to read back after a restart
_MASK = "***"
_CREDENTIAL = re.compile(r"(?i)\b(key|bearer)(\s+)[A-Za-z0-9_\-.]+:[A-Za-z0-9_\-.]+")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.\-]")


@dataclass(frozen=True)
class LogRecord:
    """One log line. ``source`` is "runner", "build", "gateway" or "service"."""

    timestamp: float
    level: str
    source: str
    owner: str
    app: str
    runner_id: str | None
    request_id: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LogRecord:
        return cls(
            timestamp=float(data["timestamp"]),
            level=str(data["level"]),
            source=str(data["source"]),
            owner=str(data["owner"]),
            app=str(data["app"]),
            runner_id=data.get("runner_id"),
            request_id=data.get("request_id"),
            message=str(data["message"]),
        )


_Key = tuple[str, str]


class _Follower:
    """A live subscriber: a bounded queue on the subscriber's own loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[LogRecord] = asyncio.Queue(maxsize=_FOLLOW_QUEUE)

    def offer(self, record: LogRecord) -> None:
        # Runs on the follower's loop; a full queue drops its oldest record.
        if self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(record)


class LogHub:
    """Collects, keeps and fans out log records; see the module docstring."""

    def __init__(self, data_dir: Path | None = None, *, ring_size: int = 5000) -> None:
        self._dir = Path(data_dir) / "logs" if data_dir is not None else None
        self._ring_size = ring_size
        self._rings: dict[_Key, deque[LogRecord]] = {}
        self._followers: dict[_Key, set[_Follower]] = {}
        self._pending: dict[_Key, list[str]] = {}
        self._secrets: set[str] = set()
        self._lock = threading.Lock()  # emit may come from a backend's reader thread
        self._flush_scheduled = False

    def add_secret(self, value: str) -> None:
        """Mask ``value`` in every later record (secret env values, keys)."""
        if len(value) >= 4:  # masking tiny strings would shred ordinary text
            self._secrets.add(value)

    def emit(self, record: LogRecord) -> None:
        """Store and fan out ``record``; never blocks on followers or on disk."""
        record = self._redact(record)
        key = (record.owner, record.app)
        with self._lock:
            self._ring(key).append(record)
            if self._dir is not None:
                self._pending.setdefault(key, []).append(json.dumps(record.to_dict()))
            followers = list(self._followers.get(key, ()))
        for follower in followers:
            _call_on(follower.loop, follower.offer, record)
        if self._dir is not None:
            self._schedule_flush()

    def recent(self, owner: str, app: str, limit: int = 1000) -> list[LogRecord]:
        """The last ``limit`` records of an app, oldest first (read back from disk if needed)."""
        with self._lock:
            ring = self._rings.get((owner, app))
            # An app with no records yet gets no ring here: callers name apps that may not
            # exist (a log probe), and each ring kept for them would be memory held forever.
            items = list(ring) if ring is not None else self._read_tail((owner, app))
            if ring is None and items:
                self._rings[(owner, app)] = deque(items, maxlen=self._ring_size)
        return items[-limit:] if limit > 0 else []

    async def follow(self, owner: str, app: str) -> AsyncIterator[LogRecord]:
        """Recent records, then live ones as they are emitted, until the caller stops."""
        key = (owner, app)
        follower = _Follower(asyncio.get_running_loop())
        with self._lock:
            backlog = list(self._ring(key))
            self._followers.setdefault(key, set()).add(follower)
        try:
            for record in backlog:
                yield record
            while True:
                yield await follower.queue.get()
        finally:
            with self._lock:
                self._followers.get(key, set()).discard(follower)

    def forget(self, owner: str, app: str) -> None:
        """Drop an app's in-memory ring (its file stays); used when an app is deleted."""
        self.flush()
        with self._lock:
            self._rings.pop((owner, app), None)

    def flush(self) -> None:
        """Append every pending record to its file now."""
        with self._lock:
            pending, self._pending = self._pending, {}
            self._flush_scheduled = False
        for key, lines in pending.items():
            self._append(key, lines)

    def close(self) -> None:
        self.flush()

    # -- internals ---------------------------------------------------------------------

    def _redact(self, record: LogRecord) -> LogRecord:
        message = _CREDENTIAL.sub(lambda m: f"{m.group(1)}{m.group(2)}{_MASK}", record.message)
        for secret in self._secrets:
            if secret in message:
                message = message.replace(secret, _MASK)
        if message is record.message:
            return record
        return LogRecord(**{**record.to_dict(), "message": message})

    def _ring(self, key: _Key) -> deque[LogRecord]:
        # Called with the lock held; the first touch of an app reads its file's tail back.
        ring = self._rings.get(key)
        if ring is None:
            ring = deque(self._read_tail(key), maxlen=self._ring_size)
            self._rings[key] = ring
        return ring

    def _path(self, key: _Key) -> Path | None:
        if self._dir is None:
            return None
        owner, app = (_safe_name(part) for part in key)
        return self._dir / owner / f"{app}.jsonl"

    def _read_tail(self, key: _Key) -> list[LogRecord]:
        path = self._path(key)
        if path is None or not path.is_file():
            return []
        with path.open("rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(max(0, size - _TAIL_BYTES))
            lines = fh.read().splitlines()
        if size > _TAIL_BYTES:
            lines = lines[1:]  # the first line was cut in the middle
        return [r for r in map(_parse_line, lines[-self._ring_size :]) if r is not None]

    def _append(self, key: _Key, lines: list[str]) -> None:
        path = self._path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")

    def _schedule_flush(self) -> None:
        with self._lock:
            if self._flush_scheduled:
                return
            self._flush_scheduled = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()  # no loop here (a thread, a script): write at once
            return
        loop.call_later(_FLUSH_DELAY, self.flush)


def _safe_name(part: str) -> str:
    # Owners and app names are validated upstream; this only guarantees the path stays put.
    name = _SAFE_NAME.sub("_", part)
    return f"_{name}" if not name or name.startswith(".") else name


def _parse_line(line: bytes) -> LogRecord | None:
    try:
        return LogRecord.from_dict(json.loads(line))
    except (ValueError, KeyError, TypeError):
        return None  # a torn last line after a crash: skip it


def _call_on(loop: asyncio.AbstractEventLoop, fn: Any, record: LogRecord) -> None:
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        fn(record)
    elif not loop.is_closed():
        loop.call_soon_threadsafe(fn, record)
