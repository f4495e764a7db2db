"""Persistence: the ``Store`` protocol and its SQLite (WAL) implementation.

The protocol speaks in ``buildsvc.records`` records, never rows, so a PostgreSQL store can
stand in later. ``SQLiteStore`` keeps one connection behind a lock: every call is a single
indexed statement or a short ``BEGIN IMMEDIATE`` transaction (tens of microseconds), so async
code calls it inline instead of paying a thread hop. The gateway's hot path, ``resolve``,
reads an in-memory cache that every app or revision write clears.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from buildsvc import sqlite
from buildsvc.records import AppRecord, KeyRecord, RevisionRecord, RunnerRecord

__all__ = ["SCHEMA_VERSION", "SQLiteStore", "Store", "StoreError", "new_revision_id"]

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY, owner TEXT NOT NULL, name TEXT NOT NULL, hash TEXT NOT NULL,
    admin INTEGER NOT NULL, created_at REAL NOT NULL, revoked_at REAL
);
CREATE INDEX IF NOT EXISTS keys_owner ON keys (owner);
CREATE TABLE IF NOT EXISTS apps (
    owner TEXT NOT NULL, name TEXT NOT NULL, auth TEXT NOT NULL, ephemeral INTEGER NOT NULL,
    current_revision TEXT, scale TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (owner, name)
);
CREATE TABLE IF NOT EXISTS revisions (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, app TEXT NOT NULL, bundle_hash TEXT NOT NULL,
    manifest TEXT NOT NULL, env_key TEXT NOT NULL, python TEXT NOT NULL, workdir TEXT NOT NULL,
    payload TEXT NOT NULL, message TEXT NOT NULL, created_at REAL NOT NULL,
    image TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS revisions_app ON revisions (owner, app, id);
CREATE TABLE IF NOT EXISTS runners (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, app TEXT NOT NULL, revision TEXT NOT NULL,
    state TEXT NOT NULL, pid INTEGER, url TEXT, started_at REAL NOT NULL, ended_at REAL
);
CREATE INDEX IF NOT EXISTS runners_app ON runners (owner, app, started_at);
"""

# version -> the statements that bring a database of that version to the next one.
_MIGRATIONS = {
    1: ("ALTER TABLE revisions ADD COLUMN image TEXT NOT NULL DEFAULT ''",),  # container images
}

_AppKey = tuple[str, str]
_Resolved = tuple[AppRecord, RevisionRecord | None]


class StoreError(RuntimeError):
    """The database cannot be used (wrong schema version, corrupt file)."""


def new_revision_id() -> str:
    """A sortable id: 16 hex digits of nanoseconds since the epoch, then 6 random ones."""
    return f"{time.time_ns():016x}{secrets.token_hex(3)}"


class Store(Protocol):
    """What the service needs from persistence; implementations must be thread-safe."""

    def add_key(
        self, key_id: str, owner: str, name: str, key_hash: str, admin: bool
    ) -> KeyRecord: ...
    def get_key(self, key_id: str) -> tuple[KeyRecord, str] | None: ...
    def list_keys(self, owner: str | None = None) -> list[KeyRecord]: ...
    def revoke_key(self, key_id: str) -> bool: ...
    def get_app(self, owner: str, name: str) -> AppRecord | None: ...
    def list_apps(self, owner: str | None = None) -> list[AppRecord]: ...
    def put_app(self, app: AppRecord) -> None: ...
    def delete_app(self, owner: str, name: str) -> bool: ...
    def update_scale(self, owner: str, name: str, scale: dict[str, Any]) -> AppRecord | None: ...
    def commit_revision(self, app: AppRecord, revision: RevisionRecord) -> AppRecord: ...
    def get_revision(self, revision_id: str) -> RevisionRecord | None: ...
    def list_revisions(self, owner: str, app: str) -> list[RevisionRecord]: ...
    def resolve(self, owner: str, name: str) -> _Resolved | None: ...
    def record_runner(self, runner: RunnerRecord) -> None: ...
    def list_runner_history(
        self, owner: str | None = None, app: str | None = None, limit: int = 100
    ) -> list[RunnerRecord]: ...
    def close(self) -> None: ...


class SQLiteStore:
    """``Store`` on one SQLite file in WAL mode."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite.connect(self.path, _SCHEMA, self._lock)
        self._cache: dict[_AppKey, _Resolved | None] = {}
        with self._write() as db:  # a file we cannot use is rolled back, not half-migrated
            version = sqlite.ensure_version(db, SCHEMA_VERSION, _MIGRATIONS)
            if version != SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: schema version {version}, this service knows "
                    f"{SCHEMA_VERSION}; upgrade the service or start with a fresh --data-dir"
                )

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: takes the write lock up front, never mid-way."""
        return sqlite.immediate(self._db, self._lock)

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def journal_mode(self) -> str:
        return str(self._query("PRAGMA journal_mode")[0][0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # keys

    def add_key(self, key_id: str, owner: str, name: str, key_hash: str, admin: bool) -> KeyRecord:
        record = KeyRecord(key_id, owner, name, admin, time.time())
        with self._write() as db:
            db.execute(
                "INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (key_id, owner, name, key_hash, int(admin), record.created_at),
            )
        return record

    def get_key(self, key_id: str) -> tuple[KeyRecord, str] | None:
        rows = self._query("SELECT * FROM keys WHERE key_id = ?", (key_id,))
        return (_key(rows[0]), rows[0]["hash"]) if rows else None

    def list_keys(self, owner: str | None = None) -> list[KeyRecord]:
        where, args = _filters(owner=owner)
        rows = self._query(f"SELECT * FROM keys {where} ORDER BY created_at", args)
        return [_key(row) for row in rows]

    def revoke_key(self, key_id: str) -> bool:
        with self._write() as db:
            cur = db.execute(
                "UPDATE keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (time.time(), key_id),
            )
        return cur.rowcount > 0

    # apps

    def get_app(self, owner: str, name: str) -> AppRecord | None:
        rows = self._query("SELECT * FROM apps WHERE owner = ? AND name = ?", (owner, name))
        return _app(rows[0]) if rows else None

    def list_apps(self, owner: str | None = None) -> list[AppRecord]:
        where, args = _filters(owner=owner)  # one owner: ordered by name, as before
        rows = self._query(f"SELECT * FROM apps {where} ORDER BY owner, name", args)
        return [_app(row) for row in rows]

    def put_app(self, app: AppRecord) -> None:
        with self._write() as db:
            _upsert_app(db, app)
            self._cache.clear()

    def delete_app(self, owner: str, name: str) -> bool:
        with self._write() as db:
            cur = db.execute("DELETE FROM apps WHERE owner = ? AND name = ?", (owner, name))
            db.execute("DELETE FROM revisions WHERE owner = ? AND app = ?", (owner, name))
            self._cache.clear()
        return cur.rowcount > 0

    def update_scale(self, owner: str, name: str, scale: dict[str, Any]) -> AppRecord | None:
        with self._write() as db:
            db.execute(
                "UPDATE apps SET scale = ? WHERE owner = ? AND name = ?",
                (json.dumps(scale), owner, name),
            )
            self._cache.clear()
            return self.get_app(owner, name)

    # revisions

    def commit_revision(self, app: AppRecord, revision: RevisionRecord) -> AppRecord:
        """Store ``revision`` and make it ``app``'s current one, in one transaction."""
        with self._write() as db:
            existing = self.get_app(app.owner, app.name)
            created = existing.created_at if existing else (app.created_at or time.time())
            current = AppRecord(
                app.owner, app.name, app.auth, app.ephemeral, revision.id, app.scale, created
            )
            db.execute(
                "INSERT INTO revisions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _revision_row(revision),
            )
            _upsert_app(db, current)
            self._cache.clear()
        return current

    def get_revision(self, revision_id: str) -> RevisionRecord | None:
        rows = self._query("SELECT * FROM revisions WHERE id = ?", (revision_id,))
        return _revision(rows[0]) if rows else None

    def list_revisions(self, owner: str, app: str) -> list[RevisionRecord]:
        rows = self._query(
            "SELECT * FROM revisions WHERE owner = ? AND app = ? ORDER BY id", (owner, app)
        )
        return [_revision(row) for row in rows]

    def resolve(self, owner: str, name: str) -> _Resolved | None:
        """The app and its current revision: the gateway asks this on every request."""
        key = (owner, name)
        try:
            return self._cache[key]
        except KeyError:
            pass
        with self._lock:
            app = self.get_app(owner, name)
            rev = self.get_revision(app.current_revision) if app and app.current_revision else None
            resolved = (app, rev) if app else None
            if resolved is not None:  # a miss is not kept: any caller can name any path
                self._cache[key] = resolved
        return resolved

    # runner history

    def record_runner(self, runner: RunnerRecord) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO runners VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (runner.id, runner.owner, runner.app, runner.revision, runner.state,
                 runner.pid, runner.url, runner.started_at, runner.ended_at),
            )  # fmt: skip

    def list_runner_history(
        self, owner: str | None = None, app: str | None = None, limit: int = 100
    ) -> list[RunnerRecord]:
        clauses, args = _filters(owner=owner, app=app)
        rows = self._query(
            f"SELECT * FROM runners {clauses} ORDER BY started_at DESC LIMIT ?", (*args, limit)
        )
        return [RunnerRecord(**dict(row)) for row in rows]


def _filters(**values: str | None) -> tuple[str, tuple[str, ...]]:
    given = {k: v for k, v in values.items() if v is not None}
    if not given:
        return "", ()
    return "WHERE " + " AND ".join(f"{k} = ?" for k in given), tuple(given.values())


def _upsert_app(db: sqlite3.Connection, app: AppRecord) -> None:
    db.execute(
        "INSERT INTO apps VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (owner, name) DO UPDATE SET "
        "auth = excluded.auth, ephemeral = excluded.ephemeral, "
        "current_revision = excluded.current_revision, scale = excluded.scale",
        (app.owner, app.name, app.auth, int(app.ephemeral), app.current_revision,
         json.dumps(app.scale), app.created_at or time.time()),
    )  # fmt: skip


def _key(row: sqlite3.Row) -> KeyRecord:
    return KeyRecord(
        key_id=row["key_id"],
        owner=row["owner"],
        name=row["name"],
        admin=bool(row["admin"]),
        created_at=row["created_at"],
        revoked=row["revoked_at"] is not None,
    )


def _app(row: sqlite3.Row) -> AppRecord:
    return AppRecord(
        owner=row["owner"],
        name=row["name"],
        auth=row["auth"],
        ephemeral=bool(row["ephemeral"]),
        current_revision=row["current_revision"],
        scale=json.loads(row["scale"]),
        created_at=row["created_at"],
    )


def _revision_row(rev: RevisionRecord) -> tuple[Any, ...]:
    manifest = json.dumps(rev.manifest)
    created = rev.created_at or time.time()
    return (rev.id, rev.owner, rev.app, rev.bundle_hash, manifest, rev.env_key, rev.python,
            rev.workdir, rev.payload, rev.message, created, rev.image)  # fmt: skip


def _revision(row: sqlite3.Row) -> RevisionRecord:
    values = dict(row)
    values["manifest"] = json.loads(values["manifest"])
    return RevisionRecord(**values)
