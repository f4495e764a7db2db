"""The fleet against real runner processes (local backend + stand-in runners).

Each test drives a whole stack (store, fleet, gateway on a real port) in one event loop and
waits on conditions with deadlines, never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fleet_helpers import OWNER, Stack, stack, wait_for

import buildsvc.fleet
from buildsvc.fleet import (
    AppStopped,
    NoRunnerAvailable,
    RunnerLoad,
    ScalePolicy,
    desired_runners,
)
from buildsvc.runtime.base import RunnerStartError, RunnerState

pytestmark = pytest.mark.slow


async def _post(s: Stack, app: str, path: str, **kw: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{s.url}/{OWNER}/{app}/{path}", **kw) as resp:
            return resp.status, await resp.json()


def _run(scenario: Any, tmp_path: Path, **kw: Any) -> None:
    async def main() -> None:
        async with stack(tmp_path, **kw) as s:
            await scenario(s)

    asyncio.run(main())


def test_public_surface() -> None:
    assert sorted(buildsvc.fleet.__all__) == [
        "AppStopped", "Fleet", "FleetError", "Lease", "NoRunnerAvailable", "RunnerInfo",
        "RunnerLoad", "ScaleDecision", "ScalePolicy", "desired_runners",
    ]  # fmt: skip


def test_desired_runners_stops_expired_idle_but_keeps_the_floor() -> None:
    policy = ScalePolicy(min_concurrency=1, max_concurrency=5, keep_alive=10)
    runners = [
        RunnerLoad("old", 0, last_used=0, starting=False),
        RunnerLoad("older", 0, last_used=-5, starting=False),
        RunnerLoad("busy", 1, last_used=-50, starting=False),
        RunnerLoad("fresh", 0, last_used=95, starting=False),
    ]
    decision = desired_runners(policy, runners, now=100)
    assert decision.stop == ("older", "old") and decision.start == 0
    floor = desired_runners(ScalePolicy(3, 5, 10), runners[:2], now=100)
    assert floor.stop == () and floor.start == 1
    capped = desired_runners(ScalePolicy(4, 2, 10), [], now=0)
    assert capped.start == 2


def test_cold_start_then_warm_reuse(tmp_path: Path) -> None:
    async def scenario(s: Stack) -> None:
        s.deploy("hello")
        assert s.runners("hello") == []
        status, first = await _post(s, "hello", "echo", data=b"a")
        assert status == 200 and len(s.runners("hello")) == 1
        for _ in range(3):
            status, again = await _post(s, "hello", "echo", data=b"b")
            assert status == 200 and again["pid"] == first["pid"]
        assert [r.state for r in s.runners("hello")] == [RunnerState.IDLE]
        assert s.runners("hello")[0].in_flight == 0

    _run(scenario, tmp_path)


def test_max_multiplexing_is_respected(tmp_path: Path) -> None:
    async def scenario(s: Stack) -> None:
        s.deploy("mux", max_multiplexing=2, max_concurrency=1)
        results = await asyncio.gather(*(_post(s, "mux", "sleep?s=0.3") for _ in range(5)))
        assert all(status == 200 for status, _ in results)
        assert {body["pid"] for _, body in results} == {results[0][1]["pid"]}
        assert max(body["max_active"] for _, body in results) == 2

    _run(scenario, tmp_path)


def test_max_concurrency_is_respected_under_load(tmp_path: Path) -> None:
    async def scenario(s: Stack) -> None:
        s.deploy("capped", max_concurrency=2)
        seen: set[str] = set()
        most = 0

        async def sample() -> None:
            nonlocal most
            while True:
                live = s.runners("capped")
                seen.update(r.id for r in live)
                most = max(most, len(live))
                await asyncio.sleep(0.005)

        sampler = asyncio.create_task(sample())
        results = await asyncio.gather(*(_post(s, "capped", "sleep?s=0.2") for _ in range(8)))
        sampler.cancel()
        assert all(status == 200 for status, _ in results)
        assert len({body["pid"] for _, body in results}) == 2
        assert most == 2 and len(seen) == 2
        history = s.store.list_runner_history(OWNER, "capped")
        assert len({r.id for r in history}) == 2

    _run(scenario, tmp_path)


def test_keep_alive_reaps_idle_runners(tmp_path: Path) -> None:
    async def scenario(s: Stack) -> None:
        s.deploy("brief", keep_alive=1)
        status, body = await _post(s, "brief", "echo")
        assert status == 200 and len(s.runners("brief")) == 1
        await wait_for(lambda: not s.runners("brief"), what="the idle runner to be reaped")
        messages = [r.message for r in s.logs.recent(OWNER, "brief")]
        assert any("idle past keep_alive" in m for m in messages)
        await wait_for(lambda: _gone(body["pid"]), what="the runner process to exit")

    _run(scenario, tmp_path)


def test_min_concurrency_is_kept_warm(tmp_path: Path) -> None:
    async def scenario(s: Stack) -> None:
        app, _ = s.deploy("warm", min_concurrency=1, keep_alive=0)
        await s.fleet.revision_changed(app, "rolling")
        await wait_for(
            lambda: [r.state for r in s.runners("warm")] == [RunnerState.IDLE],
            what="one warm runner",
        )
        first = s.runners("warm")[0].id
        status, _ = await _post(s, "warm", "echo")
        assert status == 200
        # Several reaper passes later (keep_alive = 0), the floor still holds the same runner.
        await asyncio.sleep(0.5)
        assert [r.id for r in s.runners("warm")] == [first]

    _run(scenario, tmp_path)


def test_runner_that_dies_is_removed_and_replaced(tmp_path: Path) -> None:
    async def scenario(s: Stack) -> None:
        s.deploy("fragile")
        status, body = await _post(s, "fragile", "echo")
        assert status == 200
        os.kill(body["pid"], signal.SIGKILL)
        await wait_for(lambda: not s.runners("fragile"), what="the dead runner to be removed")
        messages = [r.message for r in s.logs.recent(OWNER, "fragile")]
        assert any("exited unexpectedly" in m for m in messages)
        assert [h.state for h in s.store.list_runner_history(OWNER, "fragile")] == ["FAILED"]
        status, again = await _post(s, "fragile", "echo")
        assert status == 200 and again["pid"] != body["pid"]

    _run(scenario, tmp_path)


def test_ensure_runner_surfaces_setup_errors(tmp_path: Path) -> None:
    async def scenario(s: Stack) -> None:
        app, rev = s.deploy("broken", behavior={"fail_setup": True})
        with pytest.raises(RunnerStartError) as caught:
            await s.fleet.ensure_runner(app, rev)
        assert "model weights missing" in caught.value.detail
        assert s.runners("broken") == []
        good_app, good_rev = s.deploy("fine")
        info = await s.fleet.ensure_runner(good_app, good_rev)
        assert info.state == RunnerState.IDLE and info.url
        assert (await s.fleet.ensure_runner(good_app, good_rev)).id == info.id

    _run(scenario, tmp_path)


def test_acquire_times_out_when_every_slot_is_busy(tmp_path: Path) -> None:
    async def scenario(s: Stack) -> None:
        app, rev = s.deploy("busy", max_concurrency=1)
        lease = await s.fleet.acquire(app, rev)
        with pytest.raises(NoRunnerAvailable):
            await s.fleet.acquire(app, rev, timeout=0.2)
        waiting = asyncio.create_task(s.fleet.acquire(app, rev, timeout=10))
        await asyncio.sleep(0)
        await lease.release()
        second = await waiting
        assert second.runner.id == lease.runner.id and second.runner.in_flight == 1
        await second.release()
        assert len(s.runners("busy")) == 1

    _run(scenario, tmp_path)


def test_rolling_revision_change_drains_old_runners(tmp_path: Path) -> None:
    async def scenario(s: Stack) -> None:
        s.deploy("roll")
        _, old = await _post(s, "roll", "echo")
        slow = asyncio.create_task(_post(s, "roll", "sleep?s=0.5"))
        await wait_for(lambda: s.runners("roll")[0].in_flight == 1, what="a request in flight")
        app, rev = s.deploy("roll")
        await s.fleet.revision_changed(app, "rolling")
        status, new = await _post(s, "roll", "echo")
        assert status == 200 and new["pid"] != old["pid"]
        status, body = await slow
        assert status == 200 and body["pid"] == old["pid"]  # the old runner finished it
        await wait_for(
            lambda: [r.revision for r in s.runners("roll")] == [rev.id],
            what="the old runner to stop after draining",
        )

    _run(scenario, tmp_path)


def test_gpus_are_assigned_and_released(tmp_path: Path) -> None:
    # No GPU exists here: the allocator emulates two, which is all the fleet talks to.
    async def scenario(s: Stack) -> None:
        s.deploy("gpu", num_gpus=1, max_concurrency=2)
        results = await asyncio.gather(*(_post(s, "gpu", "echo") for _ in range(2)))
        cuda = sorted(body["cuda"] for _, body in results)
        assert all(status == 200 for status, _ in results)
        assert set(cuda) <= {"0", "1"}
        await s.fleet.stop_app(OWNER, "gpu")
        assert s.runners("gpu") == [] and s.gpus.free() == [0, 1]

    _run(scenario, tmp_path, gpus=2)


def test_runner_logs_carry_runner_and_request_ids(tmp_path: Path) -> None:
    async def scenario(s: Stack) -> None:
        s.deploy("chatty")
        status, _ = await _post(s, "chatty", "log", headers={"x-fal-request-id": "req-42"})
        assert status == 200
        rid = s.runners("chatty")[0].id

        def logged() -> bool:
            return any(
                r.message == "endpoint log line req-42" for r in s.logs.recent(OWNER, "chatty")
            )

        await wait_for(logged, what="the endpoint's log line")
        line = next(r for r in s.logs.recent(OWNER, "chatty") if "req-42" in r.message)
        assert (line.source, line.runner_id, line.request_id) == ("runner", rid, "req-42")
        assert line.level == "STDOUT"

    _run(scenario, tmp_path)


def test_close_stops_every_runner(tmp_path: Path) -> None:
    pids: list[int] = []

    async def scenario(s: Stack) -> None:
        s.deploy("a")
        s.deploy("b")
        for app in ("a", "b"):
            _, body = await _post(s, app, "echo")
            pids.append(body["pid"])

    _run(scenario, tmp_path)
    assert all(_gone(pid) for pid in pids)


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_concurrent_cold_starts_start_only_what_the_waiters_need(tmp_path: Path) -> None:
    async def scenario(s: Stack) -> None:
        # One runner holds 4 requests: 4 simultaneous first requests need exactly one.
        s.deploy("burst", max_multiplexing=4, max_concurrency=5, behavior={"setup_delay": 0.5})
        results = await asyncio.gather(*(_post(s, "burst", "sleep?s=0.1") for _ in range(4)))
        assert all(status == 200 for status, _ in results)
        assert len({body["pid"] for _, body in results}) == 1
        assert len(s.store.list_runner_history(OWNER, "burst")) == 1
        # 6 more at once: the warm runner takes 4, so one more cold start, not six.
        results = await asyncio.gather(*(_post(s, "burst", "sleep?s=1") for _ in range(6)))
        assert all(status == 200 for status, _ in results)
        assert len(s.store.list_runner_history(OWNER, "burst")) == 2

    _run(scenario, tmp_path)


def test_stop_app_stops_runners_and_fails_waiters(tmp_path: Path) -> None:
    async def scenario(s: Stack) -> None:
        app, rev = s.deploy("stopped", max_concurrency=1)
        lease = await s.fleet.acquire(app, rev)
        waiter = asyncio.create_task(s.fleet.acquire(app, rev, timeout=10))
        await asyncio.sleep(0)
        await s.fleet.stop_app(OWNER, "stopped")
        with pytest.raises(AppStopped):
            await waiter
        await lease.release()
        assert s.runners("stopped") == []
        assert [h.state for h in s.store.list_runner_history(OWNER, "stopped")] == ["TERMINATED"]

    _run(scenario, tmp_path)


def test_recreate_stops_old_runners_before_returning(tmp_path: Path) -> None:
    async def scenario(s: Stack) -> None:
        s.deploy("recreate")
        status, old = await _post(s, "recreate", "echo")
        app, rev = s.deploy("recreate")
        await s.fleet.revision_changed(app, "recreate")
        assert s.runners("recreate") == [] and _gone(old["pid"])
        status, new = await _post(s, "recreate", "echo")
        assert status == 200 and [r.revision for r in s.runners("recreate")] == [rev.id]

    _run(scenario, tmp_path)


def test_keep_warm_backs_off_when_setup_keeps_failing(tmp_path: Path) -> None:
    async def scenario(s: Stack) -> None:
        app, _ = s.deploy("flaky", min_concurrency=1, behavior={"fail_setup": True})
        await s.fleet.revision_changed(app, "rolling")

        def failed() -> int:
            return sum(h.state == "FAILED" for h in s.store.list_runner_history(OWNER, "flaky"))

        await wait_for(lambda: failed() >= 1, what="the first failed warm start")
        await asyncio.sleep(1.0)  # ten reaper passes: without backoff, ten more attempts
        assert failed() == 1

    _run(scenario, tmp_path)
