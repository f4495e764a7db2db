"""Issue 4 pass/fail criterion 4: ``kill -9`` of the service with 100 requests queued and 10
running; after a restart every request id ends in exactly one terminal state.

The service is this file run as a script (``python tests/test_issue4_restart.py DATA READY``):
the real queue, fleet and gateway (``queue_helpers.queue_stack``) with ``alice/busy`` served
by up to 10 real runner processes (``queue_runner.py``, which logs every call it gets).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest
from queue_helpers import OWNER, queue_stack
from service_helpers import wait_until

pytestmark = pytest.mark.slow

_RUNNING, _QUEUED = 10, 100


def _start(data: Path) -> tuple[subprocess.Popen[bytes], str]:
    ready = data.parent / "ready.json"
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, __file__, str(data), str(ready)])
    info = wait_until(lambda: ready.exists() and ready.read_text(), 30, "the queue server")
    return proc, json.loads(info)["url"]


def _calls(data: Path) -> list[list[str]]:
    logs = (data / "apps" / "busy").glob("*/calls.log")
    return [line.split() for log in logs for line in log.read_text().splitlines()]


def test_kill_9_with_100_queued_and_10_running_loses_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc, url = _start(data)
    base = f"{url}/queue/{OWNER}/busy"
    try:
        with httpx.Client(timeout=30) as client:
            # FIFO: the first 10 take the 10 runners and run 3 s; the other 100 wait
            ids = [client.post(f"{base}/sleep?s={3 if i < _RUNNING else 0.2}", json={})
                   .json()["request_id"] for i in range(_RUNNING + _QUEUED)]  # fmt: skip
            wait_until(lambda: len(_calls(data)) >= _RUNNING, 60, "10 requests running")
            states = Counter(client.get(f"{base}/requests/{rid}/status").json()["status"]
                             for rid in ids)  # fmt: skip
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            assert states == {"IN_PROGRESS": _RUNNING, "IN_QUEUE": _QUEUED}
            proc, url = _start(data)
            base = f"{url}/queue/{OWNER}/busy"

            def all_done() -> list[httpx.Response] | None:
                results = [client.get(f"{base}/requests/{rid}") for rid in ids]
                return results if all(r.status_code != 202 for r in results) else None

            results = wait_until(all_done, 90, "every request to finish after the restart")
            again = [client.get(f"{base}/requests/{rid}") for rid in ids]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert [r.status_code for r in results] == [200] * len(ids)
    assert [r.content for r in again] == [r.content for r in results]  # one terminal result
    runs = Counter(call[0] for call in _calls(data))
    assert [runs[rid] for rid in ids] == [2] * _RUNNING + [1] * _QUEUED  # at-least-once
    with sqlite3.connect(data / "queue.db") as db:
        rows = db.execute("SELECT id, state, attempt FROM requests").fetchall()
    assert sorted(r[0] for r in rows) == sorted(ids)  # one row per id
    assert {r[1] for r in rows} == {"DONE"}
    attempts = {r[0]: r[2] for r in rows}
    assert [attempts[rid] for rid in ids[:_RUNNING]] == [2] * _RUNNING


async def _serve(data: Path, ready: Path) -> None:
    async with queue_stack(data) as s:
        if s.store.resolve(OWNER, "busy") is None:
            s.deploy("busy", max_concurrency=_RUNNING)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        ready.write_text(json.dumps({"url": s.url}))
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(_serve(Path(sys.argv[1]), Path(sys.argv[2])))
