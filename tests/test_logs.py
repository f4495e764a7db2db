"""The log hub: ring, persistence across restarts, live following, redaction."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import buildsvc.logs
from buildsvc.logs import LogHub, LogRecord


def _record(message: str, *, app: str = "app", t: float = 1.0, rid: str | None = None) -> LogRecord:
    return LogRecord(t, "INFO", "service", "alice", app, "r-1", rid, message)


def test_public_surface() -> None:
    assert sorted(buildsvc.logs.__all__) == ["LogHub", "LogRecord"]


def test_record_round_trips_through_a_dict() -> None:
    record = _record("hello", rid="q-1")
    assert LogRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record


def test_recent_is_per_app_bounded_and_ordered() -> None:
    hub = LogHub(ring_size=3)
    for i in range(5):
        hub.emit(_record(f"m{i}"))
    hub.emit(_record("other", app="b"))
    assert [r.message for r in hub.recent("alice", "app")] == ["m2", "m3", "m4"]
    assert [r.message for r in hub.recent("alice", "app", limit=1)] == ["m4"]
    assert [r.message for r in hub.recent("alice", "b")] == ["other"]
    assert hub.recent("alice", "none") == []


def test_logs_survive_a_restart(tmp_path: Path) -> None:
    hub = LogHub(tmp_path)
    hub.emit(_record("before restart", rid="q-7"))
    hub.close()
    path = tmp_path / "logs" / "alice" / "app.jsonl"
    assert json.loads(path.read_text().splitlines()[0])["request_id"] == "q-7"
    with path.open("a") as fh:
        fh.write('{"torn": ')  # a crash mid-write must not break reading back
    again = LogHub(tmp_path)
    assert [r.message for r in again.recent("alice", "app")] == ["before restart"]


def test_writes_are_batched_on_a_running_loop(tmp_path: Path) -> None:
    async def main() -> None:
        hub = LogHub(tmp_path)
        for i in range(100):
            hub.emit(_record(f"line {i}"))
        path = tmp_path / "logs" / "alice" / "app.jsonl"
        assert not path.exists()  # nothing written yet: one batch comes later
        hub.flush()
        assert len(path.read_text().splitlines()) == 100

    asyncio.run(main())


def test_follow_gives_backlog_then_live_records() -> None:
    async def main() -> list[str]:
        hub = LogHub()
        hub.emit(_record("old"))
        seen: list[str] = []

        async def reader() -> None:
            async for record in hub.follow("alice", "app"):
                seen.append(record.message)
                if len(seen) == 3:
                    return

        task = asyncio.create_task(reader())
        await asyncio.sleep(0)
        hub.emit(_record("new 1"))
        threading.Thread(target=hub.emit, args=(_record("from a thread"),)).start()
        await asyncio.wait_for(task, 5)
        return seen

    assert asyncio.run(main()) == ["old", "new 1", "from a thread"]


def test_a_slow_follower_loses_the_oldest_records_and_never_blocks_emit() -> None:
    async def main() -> None:
        hub = LogHub()
        stream = hub.follow("alice", "app")
        first = asyncio.ensure_future(anext(stream))
        hub.emit(_record("0"))
        assert (await first).message == "0"
        for i in range(1, 3001):  # far more than a follower may lag: emit still returns
            hub.emit(_record(str(i)))
        nxt = await anext(stream)
        assert int(nxt.message) > 1000  # the oldest were dropped, the newest are kept
        await stream.aclose()

    asyncio.run(main())


def test_credentials_and_registered_secrets_are_masked(tmp_path: Path) -> None:
    hub = LogHub(tmp_path)
    hub.add_secret("hunter2-database-password")
    hub.emit(_record("auth: Key 0123456789abcdef:s3cr3t-value ok"))
    hub.emit(_record("connecting with hunter2-database-password"))
    hub.close()
    text = (tmp_path / "logs" / "alice" / "app.jsonl").read_text()
    messages = [r.message for r in hub.recent("alice", "app")]
    assert messages == ["auth: Key *** ok", "connecting with ***"]
    assert "s3cr3t" not in text and "hunter2" not in text


def test_names_cannot_escape_the_log_directory(tmp_path: Path) -> None:
    hub = LogHub(tmp_path / "data")
    hub.emit(LogRecord(1.0, "INFO", "service", "../..", "../evil", None, None, "x"))
    hub.close()
    written = [p for p in tmp_path.rglob("*.jsonl")]
    assert written and all((tmp_path / "data" / "logs") in p.parents for p in written)
