"""Issue 4 pass/fail criteria 3 and 5, and ``fal apps scale``, through the real service.

Real SDK apps (cloudpickled by value, as packaging does) run in real runner processes behind
``python -m buildsvc``; they write what they saw to files in a marks folder, and the tests
assert from those files:

- (5) 100 concurrent requests on a cold app with max_concurrency=4, max_multiplexing=2: all
  succeed, never more than 4 runners nor 2 requests in flight in one runner; then
  ``fal apps scale --min-concurrency 1 --keep-alive 1`` (the real CLI): idle runners leave
  after keep_alive and the min_concurrency runner stays warm.
- (3) SIGTERM to a runner with 6 requests in flight: all 6 succeed, handle_exit ran once,
  teardown ran, and no request sent after the SIGTERM reached that runner.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_helpers import ServiceProcess, deploy, make_bundle, wait_until

pytestmark = pytest.mark.slow

LOAD_APP = """
import asyncio, os
import fal
from pydantic import BaseModel

MARKS = {marks!r}
_active = [0]


class Job(BaseModel):
    i: int


class Load(fal.App):
    @fal.endpoint("/")
    async def run(self, job: Job) -> dict:
        _active[0] += 1  # requests inside this process right now
        with open(os.path.join(MARKS, f"{{os.getpid()}}.log"), "a") as f:
            f.write(f"{{_active[0]}}\\n")
        try:
            await asyncio.sleep(0.15)
        finally:
            _active[0] -= 1
        return {{"pid": os.getpid(), "i": job.i}}
"""

DRAIN_APP = """
import asyncio, os
import fal
from pydantic import BaseModel

MARKS = {marks!r}


def _mark(name, line):
    with open(os.path.join(MARKS, name), "a") as f:
        f.write(line + "\\n")


class Job(BaseModel):
    i: int
    seconds: float


class Drain(fal.App):
    @fal.endpoint("/")
    async def run(self, job: Job) -> dict:
        _mark("started", f"{{os.getpid()}} {{job.i}}")
        await asyncio.sleep(job.seconds)
        return {{"pid": os.getpid(), "i": job.i}}

    def handle_exit(self):
        _mark("hooks", f"handle_exit {{os.getpid()}}")

    def teardown(self):
        _mark("hooks", f"teardown {{os.getpid()}}")
"""


def _deploy(svc: ServiceProcess, tmp: Path, source: str, cls: str, name: str,
            **options: Any) -> tuple[str, Path]:  # fmt: skip
    """Deploy ``source`` as ``name``; return (its owner, its marks folder)."""
    marks = tmp / f"marks-{name}"
    marks.mkdir()
    bundle = make_bundle(source.format(marks=str(marks)), cls, app_name=name, tmp_dir=tmp,
                         options=options)  # fmt: skip
    with svc.client() as client:
        events = list(deploy(client, bundle))
    assert events[-1]["event"] == "done", events
    return events[-1]["app"]["owner"], marks


def _runners(svc: ServiceProcess, app: str) -> list[dict[str, Any]]:
    with svc.client() as client:
        found: list[dict[str, Any]] = client.get("/v1/runners", params={"app": app}).json()[
            "runners"
        ]
    return [r for r in found if r["state"] not in ("TERMINATED", "FAILED")]


async def _call_all(svc: ServiceProcess, url: str, bodies: list[dict[str, Any]]) -> list[Any]:
    headers = {"Authorization": f"Key {svc.admin_key}"}
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(timeout=120, headers=headers, limits=limits) as client:
        return list(await asyncio.gather(*(client.post(url, json=b) for b in bodies)))


def _fal(svc: ServiceProcess, tmp: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FAL_SERVER_URL": svc.url, "FAL_KEY": svc.admin_key,
           "FALCLI_HOME": str(tmp / "home"), "COLUMNS": "200"}  # fmt: skip
    code = "from falcli.cli.main import main; main()"
    return subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_100_requests_on_a_cold_app_respect_the_caps_then_scale_live(
    module_service: ServiceProcess, tmp_path: Path
) -> None:
    svc = module_service
    owner, marks = _deploy(svc, tmp_path, LOAD_APP, "Load", "load", max_concurrency=4,
                           max_multiplexing=2, keep_alive=30)  # fmt: skip
    assert _runners(svc, "load") == []  # cold
    answers = asyncio.run(_call_all(svc, f"{svc.url}/{owner}/load",
                                    [{"i": i} for i in range(100)]))  # fmt: skip
    assert [a.status_code for a in answers] == [200] * 100
    assert sorted(a.json()["i"] for a in answers) == list(range(100))
    per_pid = {p.stem: [int(n) for n in p.read_text().split()] for p in marks.glob("*.log")}
    assert 1 <= len(per_pid) <= 4, per_pid.keys()  # never more than max_concurrency runners
    assert sum(len(v) for v in per_pid.values()) == 100
    assert max(max(v) for v in per_pid.values()) <= 2  # never more than max_multiplexing
    assert {str(a.json()["pid"]) for a in answers} == set(per_pid)

    scaled = _fal(svc, tmp_path, "apps", "scale", "load", "--min-concurrency", "1",
                  "--keep-alive", "1", "--json")  # fmt: skip
    assert scaled.returncode == 0, scaled.stderr
    scale = json.loads(scaled.stdout)["scale"]
    assert (scale["min_concurrency"], scale["keep_alive"], scale["max_concurrency"]) == (1, 1, 4)
    wait_until(lambda: len(_runners(svc, "load")) == 1, 20, "idle runners to leave")
    warm = _runners(svc, "load")[0]["id"]
    time.sleep(2.5)  # more than keep_alive twice over: the min_concurrency runner must stay
    assert [r["id"] for r in _runners(svc, "load")] == [warm]

    shown = _fal(svc, tmp_path, "apps", "get", "load")
    assert shown.returncode == 0 and "min_concurrency" in shown.stdout, shown.stderr
    listed = _fal(svc, tmp_path, "apps", "list").stdout.splitlines()
    row = dict(zip(listed[0].split("\t"), next(r for r in listed if r.startswith("load\t"))
                   .split("\t"), strict=True))  # fmt: skip
    assert (row["MIN"], row["MAX"], row["KEEP_ALIVE"]) == ("1", "4", "1")


def test_apps_scale_refuses_bad_values_naming_the_fix(
    module_service: ServiceProcess, tmp_path: Path
) -> None:
    _deploy(module_service, tmp_path, LOAD_APP, "Load", "picky", max_concurrency=2)
    bad = _fal(module_service, tmp_path, "apps", "scale", "picky", "--min-concurrency", "5")
    assert bad.returncode == 1
    assert "min_concurrency = 5 is greater than max_concurrency = 2" in bad.stderr
    negative = _fal(module_service, tmp_path, "apps", "scale", "picky", "--keep-alive", "-1")
    assert negative.returncode == 1 and "keep_alive = -1" in negative.stderr
    ghost = _fal(module_service, tmp_path, "apps", "scale", "ghost", "--keep-alive", "5")
    assert ghost.returncode == 1 and "not found" in ghost.stderr


def test_sigterm_with_6_in_flight_drains_them_and_routes_nothing_new_there(
    module_service: ServiceProcess, tmp_path: Path
) -> None:
    svc = module_service
    owner, marks = _deploy(svc, tmp_path, DRAIN_APP, "Drain", "drain", max_multiplexing=6,
                           max_concurrency=2, termination_grace_period_seconds=30)  # fmt: skip
    url = f"{svc.url}/{owner}/drain"

    async def scenario() -> tuple[list[Any], list[Any], int]:
        first = asyncio.ensure_future(_call_all(svc, url, [{"i": i, "seconds": 2.5}
                                                           for i in range(6)]))  # fmt: skip
        started = marks / "started"
        await _until(lambda: started.exists() and len(started.read_text().split("\n")) > 6,
                     "6 requests in flight")  # fmt: skip
        pids = {line.split()[0] for line in started.read_text().splitlines()}
        assert len(pids) == 1  # max_multiplexing 6: one runner holds all six
        pid = int(pids.pop())
        os.kill(pid, signal.SIGTERM)
        later = await _call_all(svc, url, [{"i": 100 + i, "seconds": 0} for i in range(3)])
        return await first, later, pid

    drained, later, pid = asyncio.run(scenario())
    assert [(a.status_code, a.json()["pid"]) for a in drained] == [(200, pid)] * 6
    assert [a.status_code for a in later] == [200] * 3
    assert pid not in {a.json()["pid"] for a in later}  # nothing new went to the old runner
    on_old = [line.split()[1] for line in (marks / "started").read_text().splitlines()
              if int(line.split()[0]) == pid]  # fmt: skip
    assert sorted(on_old) == [str(i) for i in range(6)]
    hooks = marks / "hooks"
    wait_until(lambda: hooks.exists() and f"teardown {pid}" in hooks.read_text(), 20, "teardown")
    mine = [line.split()[0] for line in hooks.read_text().splitlines() if line.endswith(str(pid))]
    assert mine == ["handle_exit", "teardown"]
    wait_until(lambda: pid not in {r["pid"] for r in _runners(svc, "drain")}, 20,
               "the drained runner to leave the fleet")  # fmt: skip


async def _until(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
