"""How the service opens and writes its SQLite files (the app store and the queue's rows).

Both stores keep one connection in autocommit mode behind a re-entrant lock, in WAL mode
with ``synchronous=NORMAL`` (a committed row survives a killed process; only a power loss can
drop the last few commits) and a busy timeout, and write in ``BEGIN IMMEDIATE`` transactions,
which take the write lock up front so two writers never deadlock half-way. A store whose
file format changes over time records a schema version and migrates older files in place.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["connect", "ensure_version", "immediate"]

_BUSY_TIMEOUT_MS = 5000


def connect(path: Path, schema: str, lock: threading.RLock) -> sqlite3.Connection:
    """Open ``path`` (rows as ``sqlite3.Row``) in WAL mode and apply ``schema``, which must be
    idempotent DDL (``CREATE ... IF NOT EXISTS``)."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable across crashes
    with lock:
        db.executescript(schema)  # executescript commits by itself
    return db


@contextmanager
def immediate(db: sqlite3.Connection, lock: threading.RLock) -> Iterator[sqlite3.Connection]:
    """A ``BEGIN IMMEDIATE`` transaction, committed on success and rolled back on any error.
    A call nested inside an open transaction joins it."""
    with lock:
        if db.in_transaction:
            yield db
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def ensure_version(
    db: sqlite3.Connection, version: int, migrations: Mapping[int, Sequence[str]]
) -> int:
    """Stamp a new database with ``version`` or migrate an older one (inside the caller's
    transaction; it keeps its data); return the version the file has now, which differs
    from ``version`` when the file is newer than this code or has no migration path.

    ``migrations`` maps a version to the statements that bring a file to the next one; the
    schema must hold ``CREATE TABLE schema_version (version INTEGER NOT NULL)``."""
    row = db.execute("SELECT version FROM schema_version").fetchone()
    if row is None:
        db.execute("INSERT INTO schema_version VALUES (?)", (version,))
        return version
    found = int(row[0])
    while found in migrations:
        for statement in migrations[found]:
            db.execute(statement)
        found += 1
        db.execute("UPDATE schema_version SET version = ?", (found,))
    return found
