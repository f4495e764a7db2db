"""Health checks against real runner processes (``queue_runner.py``) behind the real fleet,
gateway and queue: regular probes replace a runner after ``failure_threshold`` failures in a
row (counted only after ``start_period_seconds``), and a 500/502 answer gets one probe.

The probe interval (10 s in the service) is shortened through the module constant the
fleet reads when it is made, so the tests take seconds.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from queue_helpers import OWNER, QStack, queue_stack, wait_for

import buildsvc.fleet
from buildsvc.runtime.base import RunnerState

pytestmark = pytest.mark.slow

_UNHEALTHY = {"path": "/hang", "start_period_seconds": 3, "timeout_seconds": 1,
              "failure_threshold": 2, "call_regularly": True}  # fmt: skip


def _run(scenario: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buildsvc.fleet, "_HEALTH_INTERVAL", 0.1)

    async def main() -> None:
        async with queue_stack(tmp_path / "data") as s:
            await scenario(s)

    asyncio.run(main())


def _live(s: QStack, app: str) -> list[Any]:
    return [r for r in s.fleet.list_runners(OWNER, app) if r.state in
            (RunnerState.IDLE, RunnerState.RUNNING)]  # fmt: skip


async def _deploy(s: QStack, name: str, **options: Any) -> None:
    """Commit a revision and tell the fleet, as the service's deployer does."""
    s.deploy(name, **options)
    await s.fleet.revision_changed(s.store.get_app(OWNER, name), "recreate")


async def _post(s: QStack, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{s.url}/{OWNER}/{path}", json={}) as resp:
            return resp.status, await resp.json()


def test_runner_failing_its_health_check_is_replaced_after_the_start_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(s: QStack) -> None:
        await _deploy(s, "sick", min_concurrency=1, health_check=_UNHEALTHY)
        await _deploy(s, "well", min_concurrency=1,
                      health_check={**_UNHEALTHY, "path": "/health"})  # fmt: skip
        first = (await wait_for(lambda: _live(s, "sick"), what="a warm sick runner"))[0]
        well = (await wait_for(lambda: _live(s, "well"), what="a warm well runner"))[0]
        await wait_for(lambda: first.id not in {r.id for r in s.fleet.list_runners(OWNER,
                       "sick")}, 20, "the unhealthy runner to be replaced")  # fmt: skip
        # 2 failures (1 s timeouts) in a row, counted only once the runner is 3 s old: the
        # second ends 1 s or more after that (without the start period: about 2.5 s)
        assert time.time() - first.started_at >= 4.0
        await wait_for(lambda: _live(s, "sick"), what="a new runner in its place")
        messages = [r.message for r in s.logs.recent(OWNER, "sick")]
        assert any(f"runner {first.id} is unhealthy (failed 2 health checks" in m
                   for m in messages)  # fmt: skip
        assert [r.id for r in _live(s, "well")] == [well.id]  # a healthy one stays

    _run(scenario, tmp_path, monkeypatch)


def test_a_500_or_502_answer_probes_the_runner_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(s: QStack) -> None:
        s.deploy("sane")  # no health_check: GET /health, which answers 200
        s.deploy("flaky", health_check={"path": "/missing"})  # 404: unhealthy
        assert (await _post(s, "sane/code?status=500"))[0] == 500
        sane = _live(s, "sane")[0].id
        status, _ = await _post(s, "flaky/code?status=502")
        assert status == 502  # answered as is: a sync call is never retried
        flaky = s.fleet.list_runners(OWNER, "flaky")[0].id
        await wait_for(lambda: flaky not in {r.id for r in s.fleet.list_runners(OWNER, "flaky")},
                       10, "the flaky runner to be replaced")  # fmt: skip
        assert [r.id for r in _live(s, "sane")] == [sane]
        # through the queue too: a 500 is the request's result (not retried), then a probe
        async with aiohttp.ClientSession() as client:
            async with client.post(s.q("flaky/code?status=500"), json={}) as resp:
                sub = await resp.json()

            async def result() -> Any:
                async with client.get(sub["response_url"]) as r:
                    return r.status if r.status != 202 else None

            assert await wait_for(result, 20, "the queued 500") == 500
        runner = [c[2] for c in s.calls("flaky") if c[0] == sub["request_id"]]
        assert len(runner) == 1  # ran once
        await wait_for(lambda: all(r.pid != int(runner[0]) for r in _live(s, "flaky")), 10,
                       "the runner that answered 500 to be replaced")  # fmt: skip

    _run(scenario, tmp_path, monkeypatch)
