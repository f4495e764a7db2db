"""Limits at the door, through the real service (``python -m buildsvc`` with limit flags):
a body-size cap (413), a header-read deadline (a slowloris client is dropped while others
are served), a per-key rate limit (429 + Retry-After) and a per-app queue-depth cap (429).
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_helpers import ServiceProcess, deploy, make_bundle, wait_until

pytestmark = pytest.mark.slow

SLOW_APP = """
import time
import fal


class Slow(fal.App):
    @fal.endpoint("/")
    def run(self) -> dict:
        time.sleep(5)
        return {"slept": 5}
"""
_FLAGS = ["--max-body-bytes", "2000", "--header-timeout", "1", "--rate-limit", "1",
          "--rate-burst", "5", "--max-queue-depth", "3"]  # fmt: skip


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, str]]:
    tmp = tmp_path_factory.mktemp("limits")
    service = ServiceProcess(tmp / "data", _FLAGS).start()
    try:
        with service.client() as client:
            for bundle in (make_bundle(tmp_dir=tmp, app_name="echo"),
                           make_bundle(SLOW_APP, "Slow", tmp_dir=tmp, app_name="slow",
                                       options={"max_concurrency": 1})):  # fmt: skip
                events = list(deploy(client, bundle))
                assert events[-1]["event"] == "done", events
        yield service, events[-1]["app"]["owner"]
    finally:
        assert service.stop() in (0, -signal.SIGTERM), service.log()[-3000:]


def _key(service: ServiceProcess) -> dict[str, str]:
    """Headers with a fresh key of the admin's owner: its own rate-limit bucket."""
    with service.client() as client:
        key = client.post("/v1/keys", json={"name": "limits"}).json()["key"]
    return {"Authorization": f"Key {key}"}


def test_body_over_the_cap_is_413_sync_and_queued(svc: tuple[ServiceProcess, str]) -> None:
    service, owner = svc
    big = {"text": "x" * 3000}
    with httpx.Client(base_url=service.url, headers=_key(service), timeout=60) as client:
        assert client.post(f"/{owner}/echo", json={"text": "hi"}).json() == {"text": "echo: hi"}
        for path in (f"/{owner}/echo", f"/queue/{owner}/echo"):
            answer = client.post(path, json=big)
            assert answer.status_code == 413, answer.text
            assert answer.json()["error_type"] == "payload_too_large"
            assert "--max-body-bytes" in answer.json()["detail"]
            chunked = client.post(path, content=iter([b'{"text": "', b"y" * 3000, b'"}']))
            assert chunked.status_code == 413, (path, chunked.text)


def test_rate_limit_is_per_key_with_retry_after(svc: tuple[ServiceProcess, str]) -> None:
    service, owner = svc
    first, second = _key(service), _key(service)
    with httpx.Client(base_url=service.url, timeout=60) as client:
        burst = [client.post(f"/{owner}/echo", json={"text": str(i)}, headers=first)
                 for i in range(5)]  # fmt: skip
        assert [a.status_code for a in burst] == [200] * 5
        refused = client.post(f"/queue/{owner}/echo", json={"text": "6"}, headers=first)
        assert refused.status_code == 429 and refused.json()["error_type"] == "rate_limited"
        assert int(refused.headers["retry-after"]) >= 1  # one budget for sync and queue
        assert client.post(f"/{owner}/echo", json={"text": "x"}, headers=first).status_code == 429
        other = client.post(f"/queue/{owner}/echo", json={"text": "x"}, headers=second)
        assert other.status_code == 200  # another key, another bucket
        polls = [client.get(other.json()["status_url"], headers=first).status_code
                 for _ in range(10)]  # fmt: skip
        assert polls == [200] * 10  # polling is not limited: only calls that create work


def test_queue_depth_cap_is_429_queue_full(svc: tuple[ServiceProcess, str]) -> None:
    service, owner = svc
    with httpx.Client(base_url=service.url, headers=_key(service), timeout=60) as client:
        subs = [client.post(f"/queue/{owner}/slow", json={}) for _ in range(4)]
        assert [s.status_code for s in subs] == [200, 200, 200, 429]
        assert subs[3].json()["error_type"] == "queue_full"
        assert "--max-queue-depth 3" in subs[3].json()["detail"]
        for sub in subs[:3]:
            client.put(sub.json()["cancel_url"])


def test_slow_header_sender_is_dropped_while_others_are_served(
    svc: tuple[ServiceProcess, str],
) -> None:
    service, _ = svc
    host, port = service.url.removeprefix("http://").split(":")
    slow = socket.create_connection((host, int(port)))
    silent = socket.create_connection((host, int(port)))
    closed: dict[str, float] = {}
    started = time.monotonic()
    trickle = threading.Thread(target=_trickle, args=(slow, closed, started), daemon=True)
    trickle.start()
    served = []
    with httpx.Client(base_url=service.url, timeout=5) as client:
        while time.monotonic() - started < 2.5:
            t0 = time.monotonic()
            served.append((client.get("/v1/health").status_code, time.monotonic() - t0))
    trickle.join(10)
    silent.settimeout(5)
    assert silent.recv(1) == b""  # a connection that never sends is dropped too
    assert [code for code, _ in served] == [200] * len(served) and len(served) > 5
    assert max(elapsed for _, elapsed in served) < 0.5
    assert "at" in closed, "the slow client was never dropped"
    assert 0.9 <= closed["at"] <= 3.0, closed  # --header-timeout 1


def _trickle(sock: socket.socket, closed: dict[str, Any], started: float) -> None:
    """Send a request's headers one byte every 0.1 s (slowloris) until the server hangs up."""
    request = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200 + b"\r\n\r\n"
    sock.settimeout(0.1)
    for byte in request:
        try:
            sock.sendall(bytes([byte]))
            if sock.recv(1) == b"":
                break
        except TimeoutError:
            continue
        except OSError:
            break
    closed["at"] = time.monotonic() - started
    sock.close()


def test_limit_flags_are_validated(tmp_path: Path) -> None:
    bad = ServiceProcess(tmp_path / "data", ["--rate-limit", "-1"])
    with pytest.raises(AssertionError, match="exited with 2"):
        bad.start()
    assert "rate_limit = -1.0: expected a number >= 0" in bad.log()
    wait_until(lambda: bad.proc is not None and bad.proc.poll() is not None, 5, "exit")
