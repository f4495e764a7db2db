"""The durable queue's rows: the ``QueueStore`` protocol and its SQLite (WAL) implementation.

One row per request id, in ``<data_dir>/queue.db`` (its own file: the queue writes far more
often than the app store). A row moves QUEUED -> CLAIMED (a dispatch task holds it and waits
for a runner) -> RUNNING (a runner has it) -> DONE, and back to QUEUED when an attempt is
retried or its lease runs out. Every claim bumps ``attempt``; every later write of that
attempt is a compare-and-set on ``(id, attempt)``, so the answer of an attempt that lost its
lease is dropped and a request gets exactly one terminal result.

With WAL and ``synchronous=NORMAL`` a committed row survives a killed process (``kill -9``);
only a power loss can drop the last few commits. The protocol speaks in ``QueuedRequest``
records, never rows, so a PostgreSQL store can replace this one.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from buildsvc import sqlite

__all__ = ["QueueStore", "QueuedRequest", "Result", "RowState", "SQLiteQueueStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL, app TEXT NOT NULL, path TEXT NOT NULL,
    query TEXT NOT NULL, body BLOB NOT NULL, headers TEXT NOT NULL, priority INTEGER NOT NULL,
    hint TEXT, deadline REAL, no_retry INTEGER NOT NULL, webhook TEXT,
    state TEXT NOT NULL, attempt INTEGER NOT NULL, lease_until REAL, runner_id TEXT,
    created_at REAL NOT NULL, started_at REAL, finished_at REAL,
    status_code INTEGER, result BLOB, content_type TEXT, error TEXT, error_type TEXT,
    result_headers TEXT, webhook_state TEXT
);
CREATE INDEX IF NOT EXISTS requests_pending ON requests (owner, app, state, priority, seq);
CREATE INDEX IF NOT EXISTS requests_leased ON requests (state, lease_until);
CREATE INDEX IF NOT EXISTS requests_finished ON requests (state, finished_at);
"""


class RowState(StrEnum):
    QUEUED = "QUEUED"
    CLAIMED = "CLAIMED"  # a dispatch task holds it while it waits for a runner slot
    RUNNING = "RUNNING"
    DONE = "DONE"

    @property
    def wire(self) -> str:
        """The status a client sees: there is no FAILED on the wire."""
        return _WIRE[self]


_WIRE = {
    RowState.QUEUED: "IN_QUEUE", RowState.CLAIMED: "IN_QUEUE",
    RowState.RUNNING: "IN_PROGRESS", RowState.DONE: "COMPLETED",
}  # fmt: skip


@dataclass(frozen=True)
class Result:
    """A request's terminal answer: what ``GET .../requests/{id}`` replays."""

    status: int
    body: bytes
    content_type: str = "application/json"
    error: str | None = None
    error_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()  # extra response headers, e.g. a timeout's type

    @property
    def ok(self) -> bool:
        return self.status < 400


@dataclass(frozen=True)
class QueuedRequest:
    id: str
    owner: str
    app: str
    path: str  # the endpoint path, "/" + rest
    query: str
    body: bytes
    headers: list[tuple[str, str]]  # what the runner gets; never the caller's credentials
    priority: int = 0  # 0 normal, 1 low: lower runs first, then FIFO
    hint: str | None = None
    deadline: float | None = None  # X-Fal-Request-Timeout, as an absolute time.time()
    no_retry: bool = False
    webhook: str | None = None
    state: RowState = RowState.QUEUED
    attempt: int = 0
    lease_until: float | None = None
    runner_id: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    result: Result | None = None
    webhook_state: str | None = None  # "pending" | "delivered" | "failed"
    seq: int = 0


class QueueStore(Protocol):
    """What the queue needs from persistence; implementations must be thread-safe."""

    def add(self, request: QueuedRequest) -> None: ...
    def add_many(self, requests: Sequence[QueuedRequest]) -> None: ...
    def get(self, request_id: str) -> QueuedRequest | None: ...
    def position(self, request: QueuedRequest) -> int: ...
    def claim(self, owner: str, app: str, lease_until: float) -> QueuedRequest | None: ...
    def start(self, request_id: str, attempt: int, runner_id: str, lease_until: float) -> bool: ...
    def renew(self, request_id: str, attempt: int, lease_until: float) -> bool: ...
    def requeue(self, request_id: str, attempt: int) -> bool: ...
    def finish(self, request_id: str, attempt: int | None, result: Result) -> bool: ...
    def expire_leases(self, now: float) -> list[str]: ...
    def purge(self, finished_before: float) -> int: ...
    def pending_apps(self) -> list[tuple[str, str]]: ...
    def count(self, owner: str, app: str, states: Sequence[RowState]) -> int: ...
    def pending_webhooks(self) -> list[QueuedRequest]: ...
    def set_webhook_state(self, request_id: str, state: str) -> None: ...
    def close(self) -> None: ...


class SQLiteQueueStore:
    """``QueueStore`` on one SQLite file in WAL mode; every call is one short transaction."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite.connect(self.path, _SCHEMA, self._lock)

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        return sqlite.immediate(self._db, self._lock)

    def _update(self, sql: str, args: tuple[Any, ...]) -> bool:
        with self._lock:
            return self._db.execute(sql, args).rowcount == 1  # autocommit: one statement

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, request: QueuedRequest) -> None:
        self.add_many([request])

    def add_many(self, requests: Sequence[QueuedRequest]) -> None:
        """Insert new requests in one transaction (a group commit of concurrent submits)."""
        rows = [
            (r.id, r.owner, r.app, r.path, r.query, r.body, json.dumps(r.headers), r.priority,
             r.hint, r.deadline, int(r.no_retry), r.webhook, r.created_at)
            for r in requests
        ]  # fmt: skip
        with self._write() as db:
            db.executemany(
                "INSERT INTO requests (id, owner, app, path, query, body, headers, priority, "
                "hint, deadline, no_retry, webhook, state, attempt, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'QUEUED', 0, ?)",
                rows,
            )

    def get(self, request_id: str) -> QueuedRequest | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM requests WHERE id = ?", (request_id,)).fetchone()
        return _request(row) if row is not None else None

    def position(self, request: QueuedRequest) -> int:
        """How many queued requests of the same app run before this one (0: next)."""
        if request.state != RowState.QUEUED:
            return 0
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM requests WHERE owner = ? AND app = ? AND state = 'QUEUED' "
                "AND (priority < ? OR (priority = ? AND seq < ?))",
                (request.owner, request.app, request.priority, request.priority, request.seq),
            ).fetchone()
        return int(row[0])

    def claim(self, owner: str, app: str, lease_until: float) -> QueuedRequest | None:
        """Take the app's next queued request (priority, then FIFO) as a new attempt."""
        with self._write() as db:
            row = db.execute(
                "UPDATE requests SET state = 'CLAIMED', attempt = attempt + 1, lease_until = ? "
                "WHERE seq = (SELECT seq FROM requests WHERE owner = ? AND app = ? "
                "AND state = 'QUEUED' ORDER BY priority, seq LIMIT 1) RETURNING *",
                (lease_until, owner, app),
            ).fetchone()
        return _request(row) if row is not None else None

    def start(self, request_id: str, attempt: int, runner_id: str, lease_until: float) -> bool:
        return self._update(
            "UPDATE requests SET state = 'RUNNING', runner_id = ?, lease_until = ?, "
            "started_at = COALESCE(started_at, ?) "
            "WHERE id = ? AND attempt = ? AND state = 'CLAIMED'",
            (runner_id, lease_until, time.time(), request_id, attempt),
        )

    def renew(self, request_id: str, attempt: int, lease_until: float) -> bool:
        return self._update(
            "UPDATE requests SET lease_until = ? "
            "WHERE id = ? AND attempt = ? AND state IN ('CLAIMED', 'RUNNING')",
            (lease_until, request_id, attempt),
        )

    def requeue(self, request_id: str, attempt: int) -> bool:
        """Put an attempt's request back in line for the next attempt."""
        return self._update(
            "UPDATE requests SET state = 'QUEUED', lease_until = NULL, runner_id = NULL "
            "WHERE id = ? AND attempt = ? AND state IN ('CLAIMED', 'RUNNING')",
            (request_id, attempt),
        )

    def finish(self, request_id: str, attempt: int | None, result: Result) -> bool:
        """Write the terminal result, compare-and-set on ``(id, attempt)``.

        ``attempt=None`` finishes a request that is still QUEUED (cancel, expiry)."""
        args: tuple[Any, ...] = (request_id,) if attempt is None else (request_id, attempt)
        guard = (
            "state = 'QUEUED'"
            if attempt is None
            else ("attempt = ? AND state IN ('CLAIMED', 'RUNNING')")
        )
        return self._update(
            "UPDATE requests SET state = 'DONE', lease_until = NULL, finished_at = ?, "
            "status_code = ?, result = ?, content_type = ?, error = ?, error_type = ?, "
            "result_headers = ?, "
            "webhook_state = CASE WHEN webhook IS NULL THEN NULL ELSE 'pending' END "
            f"WHERE id = ? AND {guard}",
            (time.time(), result.status, result.body, result.content_type, result.error,
             result.error_type, json.dumps(result.headers), *args),
        )  # fmt: skip

    def expire_leases(self, now: float) -> list[str]:
        """Put back every request whose lease ended before ``now``; return their ids."""
        with self._write() as db:
            rows = db.execute(
                "UPDATE requests SET state = 'QUEUED', lease_until = NULL, runner_id = NULL "
                "WHERE state IN ('CLAIMED', 'RUNNING') AND lease_until < ? RETURNING id",
                (now,),
            ).fetchall()
        return [str(r[0]) for r in rows]

    def purge(self, finished_before: float) -> int:
        """Forget requests finished before then (their webhooks settled); return how many."""
        with self._lock:
            return int(self._db.execute(
                "DELETE FROM requests WHERE state = 'DONE' AND finished_at < ? "
                "AND (webhook_state IS NULL OR webhook_state != 'pending')",
                (finished_before,),
            ).rowcount)  # fmt: skip

    def pending_apps(self) -> list[tuple[str, str]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT owner, app FROM requests WHERE state = 'QUEUED'"
            ).fetchall()
        return [(str(r[0]), str(r[1])) for r in rows]

    def count(self, owner: str, app: str, states: Sequence[RowState]) -> int:
        """How many of the app's requests are in ``states`` (the scaler's queue depth with
        QUEUED; the depth cap with every unfinished state). Served by the pending index."""
        marks = ", ".join("?" * len(states))
        with self._lock:
            row = self._db.execute(
                f"SELECT COUNT(*) FROM requests WHERE owner = ? AND app = ? AND state IN ({marks})",
                (owner, app, *(str(s) for s in states)),
            ).fetchone()
        return int(row[0])

    def pending_webhooks(self) -> list[QueuedRequest]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM requests WHERE webhook_state = 'pending' ORDER BY seq"
            ).fetchall()
        return [_request(r) for r in rows]

    def set_webhook_state(self, request_id: str, state: str) -> None:
        self._update("UPDATE requests SET webhook_state = ? WHERE id = ?", (state, request_id))


def _request(row: sqlite3.Row) -> QueuedRequest:
    result = None
    if row["status_code"] is not None:
        result = Result(
            status=int(row["status_code"]), body=bytes(row["result"] or b""),
            content_type=row["content_type"] or "application/json",
            error=row["error"], error_type=row["error_type"],
            headers=tuple((str(k), str(v)) for k, v in json.loads(row["result_headers"] or "[]")),
        )  # fmt: skip
    return QueuedRequest(
        id=row["id"], owner=row["owner"], app=row["app"], path=row["path"], query=row["query"],
        body=bytes(row["body"]), headers=[(str(k), str(v)) for k, v in json.loads(row["headers"])],
        priority=int(row["priority"]), hint=row["hint"], deadline=row["deadline"],
        no_retry=bool(row["no_retry"]), webhook=row["webhook"], state=RowState(row["state"]),
        attempt=int(row["attempt"]), lease_until=row["lease_until"], runner_id=row["runner_id"],
        created_at=float(row["created_at"]), started_at=row["started_at"],
        finished_at=row["finished_at"], result=result, webhook_state=row["webhook_state"],
        seq=int(row["seq"]),
    )  # fmt: skip
