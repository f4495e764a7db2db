"""A service restart, graceful or ``kill -9``, loses no queued or running request.

The queue runs in a real child process (``queue_server.py``); the test kills it mid-request
and starts a new one on the same data directory. The interrupted request runs again (attempt
2: at-least-once) and every request ends with exactly one result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from queue_helpers import OWNER
from service_helpers import wait_until

pytestmark = pytest.mark.slow

_SERVER = Path(__file__).with_name("queue_server.py")


class _Server:
    def __init__(self, data: Path) -> None:
        self.data = data
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> _Server:
        ready = self.data.parent / "ready.json"
        ready.unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, str(_SERVER), str(self.data), str(ready)])
        info = wait_until(lambda: ready.exists() and ready.read_text(), 30, "the queue server")
        self.url = json.loads(info)["url"]
        return self

    def stop(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=20)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    srv = _Server(tmp_path / "data")
    yield srv
    if srv.proc is not None and srv.proc.poll() is None:
        srv.stop(signal.SIGTERM)


def _calls(data: Path) -> list[list[str]]:
    logs = list((data / "apps" / "slow").glob("*/calls.log"))
    return [line.split() for log in logs for line in log.read_text().splitlines()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "graceful"])
def test_restart_loses_no_queued_or_running_request(server: _Server, sig: signal.Signals) -> None:
    server.start()
    with httpx.Client(timeout=10) as client:
        ids = [client.post(f"{server.url}/queue/{OWNER}/slow/sleep?s=1", json={}).json()
               ["request_id"] for _ in range(3)]  # fmt: skip
        first = ids[0]
        wait_until(lambda: any(c[0] == first for c in _calls(server.data)), 20, "first to run")
        runner_pid = int(next(c[2] for c in _calls(server.data) if c[0] == first))
        server.stop(sig)
        wait_until(lambda: not _alive(runner_pid), 10, "the old runner to die with the service")
        server.start()

        def finished() -> list[dict[str, object]] | None:
            states = [client.get(f"{server.url}/queue/{OWNER}/slow/requests/{rid}/status").json()
                      for rid in ids]  # fmt: skip
            return states if all(s["status"] == "COMPLETED" for s in states) else None

        states = wait_until(finished, 30, "every request to complete after the restart")
        assert all("error" not in s for s in states)
        results = [client.get(f"{server.url}/queue/{OWNER}/slow/requests/{rid}") for rid in ids]
    assert [r.status_code for r in results] == [200, 200, 200]
    runs = {rid: [c for c in _calls(server.data) if c[0] == rid] for rid in ids}
    assert len(runs[first]) == 2  # interrupted: ran again (at-least-once)
    assert [len(runs[rid]) for rid in ids[1:]] == [1, 1]  # queued ones ran once
    assert results[0].json()["pid"] == int(runs[first][1][2])
