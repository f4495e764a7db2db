"""The queue inside the real service (``python -m buildsvc``) with a real SDK app: submit,
status with logs, result, a 422 that is not retried, and a ``kill -9`` of the service while
a request runs (it completes after the restart)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_helpers import ServiceProcess, deploy, make_bundle, wait_until

pytestmark = pytest.mark.slow

SLOW_APP = """
import time
import fal
from pydantic import BaseModel


class Msg(BaseModel):
    text: str


class Slow(fal.App):
    @fal.endpoint("/")
    def run(self, msg: Msg) -> Msg:
        print(f"working on {msg.text}", flush=True)
        time.sleep(1.5 if msg.text == "slow" else 0)
        return Msg(text="done: " + msg.text)
"""


def _status(client: httpx.Client, sub: dict[str, Any], want: str) -> dict[str, Any] | None:
    data: dict[str, Any] = client.get(sub["status_url"], params={"logs": "1"}).json()
    return data if data["status"] == want else None


def test_queue_in_the_real_service_survives_kill_9(service: ServiceProcess, tmp_path: Path) -> None:
    bundle = make_bundle(SLOW_APP, "Slow", tmp_dir=tmp_path, app_name="slow")
    with service.client() as client:
        events = list(deploy(client, bundle))
        assert events[-1]["event"] == "done", events
        owner = events[-1]["app"]["owner"]
        sub = client.post(f"/queue/{owner}/slow", json={"text": "hi"}).json()
        assert sub["status_url"].startswith(service.url + "/queue/")
        done = wait_until(lambda: _status(client, sub, "COMPLETED"), 60, "the request")
        assert done["logs"] is not None
        wait_until(
            lambda: any(line["message"] == "working on hi"
                        for line in _status(client, sub, "COMPLETED")["logs"]),  # type: ignore[index]
            10, "the endpoint's log line in the request's logs",
        )  # fmt: skip
        assert client.get(sub["response_url"]).json() == {"text": "done: hi"}
        bad = client.post(f"/queue/{owner}/slow", json={"wrong": 1}).json()
        wait_until(lambda: _status(client, bad, "COMPLETED"), 30, "the bad request")
        answer = client.get(bad["response_url"])
        assert answer.status_code == 422 and answer.json()["error_type"] == "http_error"
        slow = client.post(f"/queue/{owner}/slow", json={"text": "slow"}).json()
        wait_until(lambda: _status(client, slow, "IN_PROGRESS"), 30, "the slow request to start")
    service.stop(signal.SIGKILL)
    service.start()
    with service.client() as client:
        status_url = f"/queue/{owner}/slow/requests/{slow['request_id']}"
        final = wait_until(
            lambda: _status(client, {"status_url": status_url + "/status"}, "COMPLETED"), 60,
            "the interrupted request to complete after the restart",
        )  # fmt: skip
        assert "error" not in final
        assert client.get(status_url).json() == {"text": "done: slow"}
