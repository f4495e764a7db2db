"""The local process backend driving real runner agents in a real uv env."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from runtime_helpers import RecordingEvents, app_env, pid_gone, runner_spec  # noqa: F401

from buildsvc.builder.env import Env
from buildsvc.runtime.base import RunnerHandle, RunnerStartError
from buildsvc.runtime.gpus import GpuAllocator
from buildsvc.runtime.local import LocalBackend

_T = TypeVar("_T")


def run(coro: Awaitable[_T]) -> _T:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def _wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.02)


async def _post(handle: RunnerHandle, path: str, body: dict[str, object]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=handle.url, timeout=30) as client:
        return await client.post(path, json=body)


@pytest.mark.slow
def test_runner_reaches_idle_answers_and_stops_cleanly(
    app_env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: F811
    monkeypatch.setenv("FAL_TEST_SERVICE_SECRET", "s3cret")  # must not leak into runners
    events, backend = RecordingEvents(), LocalBackend()

    async def scenario() -> tuple[httpx.Response, httpx.Response, int]:
        handle = await backend.start(runner_spec(app_env, tmp_path), events)
        reply = await _post(handle, "/", {"name": "tests"})
        async with httpx.AsyncClient(base_url=handle.url) as client:
            health = await client.get("/health")
        await backend.stop(handle, 5.0)
        await backend.stop(handle, 5.0)  # idempotent
        return reply, health, await backend.wait(handle)

    reply, health, code = run(scenario())
    assert reply.json() == {"hello": "tests", "state": "RUNNING", "cuda": "", "secret": None}
    assert health.json() == {"version": "0.1.0"}
    assert code == 0
    assert events.state_names() == ["SETUP", "IDLE", "DRAINING", "TERMINATED"]
    assert "setup running" in events.log_text("stdout")


@pytest.mark.slow
def test_setup_raising_fails_start_with_the_traceback(app_env: Env, tmp_path: Path) -> None:  # noqa: F811
    events = RecordingEvents()
    spec = runner_spec(app_env, tmp_path, env={"FAIL_SETUP": "1"})
    with pytest.raises(RunnerStartError) as info:
        run(LocalBackend().start(spec, events))
    assert "Traceback" in info.value.detail
    assert "RuntimeError: setup exploded on purpose" in info.value.detail
    assert "agent.py" not in info.value.detail and "falcli" not in info.value.detail
    assert events.state_names()[-1] == "FAILED"


@pytest.mark.slow
def test_startup_timeout_kills_the_runner(app_env: Env, tmp_path: Path) -> None:  # noqa: F811
    events, started = RecordingEvents(), time.monotonic()
    spec = runner_spec(app_env, tmp_path, env={"SLOW_SETUP": "60"}, startup_timeout=1.0)
    with pytest.raises(RunnerStartError, match="startup_timeout = 1 seconds"):
        run(LocalBackend().start(spec, events))
    assert time.monotonic() - started < 20
    setup_pids = [p for p in _agent_pids(tmp_path)]
    assert all(pid_gone(p) for p in setup_pids)


def _agent_pids(workdir: Path) -> list[int]:
    """Processes whose cwd is ``workdir`` (the runner's, if it survived)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd") == str(workdir):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
def test_sigterm_drains_in_flight_then_runs_hooks_once(app_env: Env, tmp_path: Path) -> None:  # noqa: F811
    events, backend = RecordingEvents(), LocalBackend()
    marks = tmp_path / "marks"

    async def scenario() -> tuple[httpx.Response, int, bool]:
        handle = await backend.start(runner_spec(app_env, tmp_path), events)
        slow = asyncio.create_task(_post(handle, "/slow", {"seconds": 1.5}))
        await _wait_for((marks / "slow-started").exists, 10, "the slow request to start")
        stopping = asyncio.create_task(backend.stop(handle, 10.0))
        await _wait_for(lambda: (marks / "hooks").exists(), 5, "handle_exit")
        os.kill(handle.pid, signal.SIGTERM)  # a second SIGTERM must not re-run handle_exit
        refused = await _refuses_new_connections(handle)
        assert not slow.done(), "handle_exit must run while the request is still in flight"
        response = await slow
        await stopping
        return response, await backend.wait(handle), refused

    response, code, refused = run(scenario())
    assert response.json() == {"slept": 1.5}
    assert refused
    assert (marks / "hooks").read_text() == "handle_exit TERMINATING\nteardown\n"
    assert code == 0
    assert events.state_names()[-2:] == ["DRAINING", "TERMINATED"]


async def _refuses_new_connections(handle: RunnerHandle) -> bool:
    try:
        await _post(handle, "/", {})
    except httpx.ConnectError:
        return True
    return False


@pytest.mark.slow
def test_runner_past_grace_is_killed_with_its_children(app_env: Env, tmp_path: Path) -> None:  # noqa: F811
    events, backend = RecordingEvents(), LocalBackend()
    spec = runner_spec(app_env, tmp_path, env={"SPAWN_CHILD": "1"})
    marks = tmp_path / "marks"

    async def scenario() -> tuple[int, int, float]:
        handle = await backend.start(spec, events)
        child = int((marks / "child.pid").read_text())
        slow = asyncio.create_task(_post(handle, "/slow", {"seconds": 60}))
        await _wait_for((marks / "slow-started").exists, 10, "the slow request to start")
        began = time.monotonic()
        await backend.stop(handle, 0.5)
        took = time.monotonic() - began
        with pytest.raises(httpx.HTTPError):
            await slow
        return await backend.wait(handle), child, took

    code, child, took = run(scenario())
    assert code == -signal.SIGKILL
    assert took < 5
    assert pid_gone(child), "the child that ignores SIGTERM must die with the group"
    assert events.state_names()[-1] == "TERMINATED"


@pytest.mark.slow
def test_runner_sees_only_its_emulated_gpus(app_env: Env, tmp_path: Path) -> None:  # noqa: F811
    """No GPU here: the allocator is emulated; the runner process itself is real."""
    gpus = GpuAllocator.detect(emulate=4)
    gpus.allocate("other", 1)
    ids = gpus.allocate("r-gpu", 2)
    backend = LocalBackend()

    async def scenario() -> httpx.Response:
        spec = runner_spec(app_env, tmp_path, runner_id="r-gpu", gpu_ids=ids)
        handle = await backend.start(spec, RecordingEvents())
        try:
            return await _post(handle, "/", {})
        finally:
            await backend.close()

    assert run(scenario()).json()["cuda"] == "1,2"


@pytest.mark.slow
def test_payload_python_mismatch_is_refused_clearly(app_env: Env, tmp_path: Path) -> None:  # noqa: F811
    spec = runner_spec(app_env, tmp_path, env={"FAL_PAYLOAD_PYTHON": "3.10"})
    with pytest.raises(RunnerStartError) as info:
        run(LocalBackend().start(spec, RecordingEvents()))
    assert "pickled by Python 3.10" in info.value.detail
    assert "this runner runs Python 3.11" in info.value.detail


def test_missing_interpreter_is_a_start_error(tmp_path: Path) -> None:
    spec = runner_spec(Env("k", tmp_path, tmp_path / "no-such-python"), tmp_path)
    with pytest.raises(RunnerStartError, match="cannot execute"):
        run(LocalBackend().start(spec, RecordingEvents()))
