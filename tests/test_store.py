"""SQLiteStore: WAL, data kept across reopen, revisions ordered, the resolve cache."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from buildsvc.records import AppRecord, RevisionRecord, RunnerRecord
from buildsvc.store import SCHEMA_VERSION, SQLiteStore, StoreError, new_revision_id


def _revision(owner: str, app: str, bundle: str = "b" * 64) -> RevisionRecord:
    return RevisionRecord(
        id=new_revision_id(), owner=owner, app=app, bundle_hash=bundle,
        manifest={"options": {"keep_alive": 10}}, env_key="env1", python="/venv/bin/python",
        workdir="/w", payload="/p", message="first", created_at=time.time(),
    )  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    s = SQLiteStore(tmp_path / "service.db")
    yield s
    s.close()


def test_wal_mode_and_schema_version(store: SQLiteStore) -> None:
    assert store.journal_mode() == "wal"
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT version FROM schema_version").fetchone() == (SCHEMA_VERSION,)
    db.close()


def test_reopen_keeps_keys_apps_revisions(tmp_path: Path) -> None:
    first = SQLiteStore(tmp_path / "s.db")
    first.add_key("0123456789abcdef", "alice", "laptop", "h" * 64, admin=False)
    rev = _revision("alice", "echo")
    first.commit_revision(AppRecord("alice", "echo", "private", False, None, {"x": 1}), rev)
    first.close()

    second = SQLiteStore(tmp_path / "s.db")
    key, key_hash = second.get_key("0123456789abcdef") or (None, None)
    assert key is not None and key.owner == "alice" and key_hash == "h" * 64
    app = second.get_app("alice", "echo")
    assert app is not None and app.current_revision == rev.id and app.scale == {"x": 1}
    assert second.get_revision(rev.id) == rev
    second.close()


def test_wrong_schema_version_is_refused(tmp_path: Path) -> None:
    SQLiteStore(tmp_path / "s.db").close()
    db = sqlite3.connect(tmp_path / "s.db")
    db.execute("UPDATE schema_version SET version = 999")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 999"):
        SQLiteStore(tmp_path / "s.db")


def test_revisions_sort_by_creation_and_app_keeps_created_at(store: SQLiteStore) -> None:
    app = AppRecord("alice", "echo", "private", False, None)
    first = store.commit_revision(app, _revision("alice", "echo"))
    revs = [_revision("alice", "echo") for _ in range(3)]
    for rev in revs:
        current = store.commit_revision(app, rev)
    assert [r.id for r in store.list_revisions("alice", "echo")][1:] == [r.id for r in revs]
    assert current.current_revision == revs[-1].id
    assert current.created_at == first.created_at


def test_resolve_cache_is_cleared_by_writes(store: SQLiteStore) -> None:
    assert store.resolve("alice", "echo") is None
    app = AppRecord("alice", "echo", "public", False, None)
    rev = _revision("alice", "echo")
    store.commit_revision(app, rev)
    resolved = store.resolve("alice", "echo")
    assert resolved is not None and resolved[1] is not None and resolved[1].id == rev.id
    store.delete_app("alice", "echo")
    assert store.resolve("alice", "echo") is None
    assert store.list_revisions("alice", "echo") == []


def test_resolve_is_fast_enough_to_call_inline(store: SQLiteStore) -> None:
    store.commit_revision(AppRecord("a", "b", "public", False, None), _revision("a", "b"))
    started = time.perf_counter()
    for _ in range(10_000):
        store.resolve("a", "b")
    per_call = (time.perf_counter() - started) / 10_000
    assert per_call < 50e-6, f"resolve took {per_call * 1e6:.1f} us per call"


def test_concurrent_writers_from_threads(store: SQLiteStore) -> None:
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(20):
                store.commit_revision(
                    AppRecord("o", f"app-{n}", "private", False, None), _revision("o", f"app-{n}")
                )
                store.record_runner(RunnerRecord(f"r{n}-{i}", "o", f"app-{n}", "x", "IDLE", 1,
                                                 None, time.time()))  # fmt: skip
        except BaseException as exc:  # collected: a thread's exception would be lost
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.list_apps("o")) == 4
    assert sum(len(store.list_revisions("o", f"app-{n}")) for n in range(4)) == 80
    assert len(store.list_runner_history(owner="o", app="app-1")) == 20


def test_revoke_key_once(store: SQLiteStore) -> None:
    store.add_key("0123456789abcdef", "alice", "", "h", admin=False)
    assert store.revoke_key("0123456789abcdef") is True
    assert store.revoke_key("0123456789abcdef") is False
    found = store.get_key("0123456789abcdef")
    assert found is not None and found[0].revoked
