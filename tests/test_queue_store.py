"""The queue's SQLite store: order, leases, compare-and-set and recovery on reopen."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from buildsvc.queue.store import QueuedRequest, Result, RowState, SQLiteQueueStore

OK = Result(200, b'{"ok": true}')


def _req(rid: str, priority: int = 0, app: str = "a", webhook: str | None = None) -> QueuedRequest:
    return QueuedRequest(id=rid, owner="o", app=app, path="/", query="", body=b"{}",
                         headers=[("content-type", "application/json")], priority=priority,
                         webhook=webhook)  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteQueueStore]:
    s = SQLiteQueueStore(tmp_path / "queue.db")
    yield s
    s.close()


def _lease() -> float:
    return time.time() + 30


def test_claims_follow_priority_then_fifo_per_app(store: SQLiteQueueStore) -> None:
    for rid, prio in (("n1", 0), ("l1", 1), ("n2", 0), ("l2", 1)):
        store.add(_req(rid, prio))
    store.add(_req("other", 0, app="b"))
    got = [store.claim("o", "a", _lease()) for _ in range(5)]
    assert [r.id if r else None for r in got] == ["n1", "n2", "l1", "l2", None]
    assert all(r.attempt == 1 and r.state == RowState.CLAIMED for r in got if r)
    assert store.pending_apps() == [("o", "b")]


def test_queue_position_counts_who_runs_first(store: SQLiteQueueStore) -> None:
    for rid, prio in (("n1", 0), ("l1", 1), ("n2", 0)):
        store.add(_req(rid, prio))
    positions = {rid: store.position(store.get(rid)) for rid in ("n1", "n2", "l1")}
    assert positions == {"n1": 0, "n2": 1, "l1": 2}
    store.claim("o", "a", _lease())
    assert store.position(store.get("n2")) == 0 and store.position(store.get("l1")) == 1


def test_finish_is_compare_and_set_on_id_and_attempt(store: SQLiteQueueStore) -> None:
    store.add(_req("r"))
    first = store.claim("o", "a", time.time() - 1)  # a lease that already ran out
    assert first is not None and store.start("r", 1, "runner-a", time.time() - 1)
    assert store.expire_leases(time.time()) == ["r"]
    second = store.claim("o", "a", _lease())
    assert second is not None and second.attempt == 2
    assert not store.start("r", 1, "runner-a", _lease())  # the old attempt cannot move it
    assert not store.finish("r", 1, Result(200, b'"late"'))  # the late answer is dropped
    assert store.finish("r", 2, OK)
    assert not store.finish("r", 2, Result(500, b"again"))  # exactly one terminal result
    done = store.get("r")
    assert done.state == RowState.DONE and done.result == OK and done.attempt == 2


def test_requeue_then_next_claim_is_the_next_attempt(store: SQLiteQueueStore) -> None:
    store.add(_req("r"))
    store.claim("o", "a", _lease())
    assert store.requeue("r", 1) and not store.requeue("r", 1)
    assert store.get("r").state == RowState.QUEUED
    assert store.claim("o", "a", _lease()).attempt == 2


def test_cancel_of_a_queued_row_only_while_it_is_queued(store: SQLiteQueueStore) -> None:
    store.add(_req("q"))
    store.add(_req("c"))
    cancelled = Result(499, b"{}", error="cancelled", error_type="client_cancelled")
    assert store.finish("q", None, cancelled)
    assert store.claim("o", "a", _lease()).id == "c"  # the cancelled one is never handed out
    assert not store.finish("c", None, cancelled)  # claimed: no longer a queued-row cancel


def test_reopened_store_puts_leased_rows_back(tmp_path: Path) -> None:
    """A service restart (graceful or kill -9) loses nothing: rows leased by the dead process
    go back to the queue, and their next claim is the next attempt."""
    first = SQLiteQueueStore(tmp_path / "queue.db")
    for rid in ("running", "claimed", "queued"):
        first.add(_req(rid))
    first.claim("o", "a", _lease())
    first.start("running", 1, "r-1", _lease())
    first.claim("o", "a", _lease())
    # no close(): the process is gone
    again = SQLiteQueueStore(tmp_path / "queue.db")
    assert sorted(again.expire_leases(math.inf)) == ["claimed", "running"]
    states = {rid: again.get(rid).state for rid in ("running", "claimed", "queued")}
    assert set(states.values()) == {RowState.QUEUED}
    assert [again.claim("o", "a", _lease()).attempt for _ in range(3)] == [2, 2, 1]
    again.close()
    first.close()


def test_results_and_webhook_state_survive_a_reopen(tmp_path: Path) -> None:
    first = SQLiteQueueStore(tmp_path / "queue.db")
    first.add(_req("w", webhook="http://127.0.0.1:9/hook"))
    first.claim("o", "a", _lease())
    failed = Result(504, b"{}", error="slow", error_type="request_timeout",
                    headers=(("x-fal-request-timeout-type", "user"),))  # fmt: skip
    assert first.finish("w", 1, failed)
    first.close()
    again = SQLiteQueueStore(tmp_path / "queue.db")
    row = again.get("w")
    assert row.result == failed and row.webhook_state == "pending"
    assert [r.id for r in again.pending_webhooks()] == ["w"]
    again.set_webhook_state("w", "delivered")
    assert again.pending_webhooks() == []
    again.close()


def test_purge_forgets_old_results_but_not_pending_webhooks(store: SQLiteQueueStore) -> None:
    for rid, hook in (("plain", None), ("hooked", "http://127.0.0.1:9/h"), ("open", None)):
        store.add(_req(rid, webhook=hook))
    for rid in ("plain", "hooked"):
        store.claim("o", "a", _lease())
        store.finish(rid, 1, OK)
    assert store.purge(time.time() - 60) == 0  # nothing that old yet
    assert store.purge(time.time() + 1) == 1  # "hooked" waits for its webhook, "open" runs
    assert store.get("plain") is None and store.get("hooked") is not None
    assert store.get("open").state == RowState.QUEUED


def test_public_surface() -> None:
    import buildsvc.queue as queue

    assert sorted(queue.__all__) == [
        "CancelOutcome", "PREFIX", "Queue", "QueueSettings", "QueueStore", "QueuedRequest",
        "Result", "RowState", "SQLiteQueueStore", "open_queue",
    ]  # fmt: skip
    assert all(hasattr(queue, name) for name in queue.__all__)
