"""The zygote: runners forked from a pre-imported parent per env, driven through LocalBackend.

Everything is real: a uv env built by the real builder, a real zygote process, real forked
runners answering HTTP. tests/test_runtime_local.py and tests/test_agent.py run with the
zygote on (the default); tests/test_zygote_off.py runs the former again with it off.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvloop
from runtime_helpers import (  # noqa: F401
    STAND_IN_SERVICE,
    RecordingEvents,
    app_env,
    pickle_app,
    pid_gone,
    runner_spec,
    wait_until,
)

from buildsvc.builder.env import Env
from buildsvc.runtime.base import RunnerHandle, RunnerSpec, RunnerStartError
from buildsvc.runtime.local import LocalBackend

# Reports what a runner looks like from the inside.
_PROBE_APP = """
import os, random, sys
import fal

class Probe(fal.App):
    @fal.endpoint("/")
    def probe(self, name: str = "x") -> dict:
        import helper_mod  # a bundle file next to the app: needs sys.path[0] == workdir
        return {"pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgrp(),
                "sid": os.getsid(0), "cwd": os.getcwd(), "helper": helper_mod.VALUE,
                "random": random.random(), "env": sorted(os.environ),
                "secret": os.environ.get("FAL_TEST_SERVICE_SECRET"),
                "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "argv0": sys.argv[0]}
"""


def _probe_spec(built: Env, tmp: Path, runner_id: str, **overrides: Any) -> RunnerSpec:
    workdir = tmp / runner_id
    workdir.mkdir(parents=True)
    (workdir / "helper_mod.py").write_text(f"VALUE = {runner_id!r}\n")
    payload = pickle_app(tmp / f"{runner_id}-bundle", _PROBE_APP, "Probe")
    fields: dict[str, Any] = {"runner_id": runner_id, "app_name": "probe", "revision_id": "r",
                              "python": built.python, "workdir": workdir, "payload": payload,
                              "startup_timeout": 60.0, **overrides}
    return RunnerSpec(**fields)


async def _probe(backend: LocalBackend, spec: RunnerSpec) -> tuple[RunnerHandle, dict[str, Any]]:
    handle = await backend.start(spec, RecordingEvents())
    async with httpx.AsyncClient(base_url=handle.url, timeout=30) as client:
        reply = await client.post("/", json={})
    reply.raise_for_status()
    return handle, reply.json()


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _socket_inodes(pid: int) -> set[str]:
    fd_dir = Path(f"/proc/{pid}/fd")
    links = (os.readlink(fd_dir / name) for name in os.listdir(fd_dir))
    return {link for link in links if link.startswith("socket:")}


@pytest.mark.slow
def test_runners_are_forked_by_one_zygote_yet_look_freshly_spawned(
        app_env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("FAL_TEST_SERVICE_SECRET", "s3cret")  # must reach no zygote, no runner

    async def scenario() -> dict[str, Any]:
        forking, direct = LocalBackend(), LocalBackend(use_zygote=False)
        await forking.prewarm(app_env.python)
        h1, one = await _probe(forking, _probe_spec(app_env, tmp_path, "z1", gpu_ids=[1]))
        h2, two = await _probe(forking, _probe_spec(app_env, tmp_path, "z2"))
        h3, spawned = await _probe(direct, _probe_spec(app_env, tmp_path, "d1"))
        zygote = one["ppid"]
        seen = {"one": one, "two": two, "spawned": spawned, "zygote": zygote,
                "zygote_cmd": Path(f"/proc/{zygote}/cmdline").read_bytes(),
                "zygote_env": Path(f"/proc/{zygote}/environ").read_bytes(),
                "shared_sockets": _socket_inodes(h1.pid) & _socket_inodes(zygote)}
        await forking.stop(h1)
        await forking.stop(h2)
        seen["codes"] = [await forking.wait(h1), await forking.wait(h2)]
        await asyncio.gather(forking.close(), direct.close())
        seen["zygote_gone"] = pid_gone(zygote)
        return seen

    seen = asyncio.run(scenario())
    one, two, spawned = seen["one"], seen["two"], seen["spawned"]
    assert one["ppid"] == two["ppid"] != os.getpid(), "both runners come from the zygote"
    assert spawned["ppid"] == os.getpid(), "use_zygote=False spawns directly"
    assert b"buildsvc.runtime.zygote" in seen["zygote_cmd"]
    for probe, rid in ((one, "z1"), (two, "z2")):
        assert probe["pid"] == probe["pgid"] == probe["sid"], "each runner leads its session"
        assert probe["cwd"] == str(tmp_path / rid) and probe["helper"] == rid
        assert probe["secret"] is None
        assert probe["env"] == spawned["env"], "exactly the env a direct spawn gets"
        assert probe["argv0"].endswith("agent.py")
    assert (one["cuda"], two["cuda"]) == ("1", "")
    assert one["random"] != two["random"]
    assert b"s3cret" not in seen["zygote_env"]
    assert not seen["shared_sockets"], "app code must not reach the zygote's socket"
    assert seen["codes"] == [0, 0]
    assert seen["zygote_gone"], "close() stops the zygote"


_EXITING_APP = """
import os
import fal

class Quits(fal.App):
    def setup(self):
        os._exit(3)

    @fal.endpoint("/")
    def never(self, name: str = "x") -> dict:
        return {}
"""


@pytest.mark.slow
def test_exit_codes_of_forked_runners_reach_wait(app_env: Env, tmp_path: Path) -> None:  # noqa: F811
    spec = runner_spec(app_env, tmp_path, payload=pickle_app(tmp_path / "q", _EXITING_APP,
                                                             "Quits"))

    async def scenario() -> tuple[RunnerStartError, int]:
        backend = LocalBackend()
        try:
            with pytest.raises(RunnerStartError) as info:
                await backend.start(spec, RecordingEvents())
            return info.value, await backend.wait(RunnerHandle(spec.runner_id, "", 0))
        finally:
            await backend.close()

    error, code = asyncio.run(scenario())
    assert "exited with code 3 before it was ready" in str(error)
    assert code == 3


@pytest.mark.slow
def test_on_uvloop_a_refused_fork_spawns_directly_and_the_zygote_serves_on(
        app_env: Env, tmp_path: Path) -> None:  # noqa: F811
    """The service runs on uvloop. An env too big for one packet is refused by the socket."""
    big = {f"BIG_{i}": "x" * 100_000 for i in range(12)}  # > 1 MiB, < ARG_MAX

    async def scenario() -> list[dict[str, Any]]:
        backend = LocalBackend()
        try:
            return [(await _probe(backend, _probe_spec(app_env, tmp_path, rid, env=env)))[1]
                    for rid, env in (("u1", {}), ("u2", big), ("u3", {}))]
        finally:
            await backend.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        first, huge, again = runner.run(scenario())
    assert first["ppid"] == again["ppid"] != os.getpid()
    assert huge["ppid"] == os.getpid() and "BIG_5" in huge["env"]


@pytest.mark.slow
def test_killing_the_service_leaves_no_runner_and_no_zygote(
        app_env: Env, tmp_path: Path) -> None:  # noqa: F811
    spec = runner_spec(app_env, tmp_path, env={"SPAWN_CHILD": "1"})
    fields = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(spec).items()}
    service = subprocess.Popen([sys.executable, "-c", STAND_IN_SERVICE, json.dumps(fields)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert service.stdout is not None
        pids = json.loads(service.stdout.readline())
        assert pids["zygote"] != service.pid, "the runner must have been forked by a zygote"
        assert not any(pid_gone(p) for p in pids.values())
    finally:
        service.kill()  # SIGKILL: no cleanup at all
        service.wait(timeout=10)
    for name, pid in pids.items():
        wait_until(functools.partial(pid_gone, pid), 10, f"the orphaned {name} to exit")


@pytest.mark.slow
def test_a_dead_zygote_means_direct_spawns_logged_once(
        app_env: Env, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    caplog.set_level(logging.WARNING, logger="buildsvc.runtime.local")

    async def scenario() -> tuple[int, int, list[int]]:
        backend = LocalBackend()
        try:
            forked, probe = await _probe(backend, _probe_spec(app_env, tmp_path, "f1"))
            os.kill(probe["ppid"], signal.SIGKILL)
            code = await asyncio.wait_for(backend.wait(forked), 10)
            parents = []
            for rid in ("after1", "after2"):
                _, later = await _probe(backend, _probe_spec(app_env, tmp_path, rid))
                parents.append(later["ppid"])
            return code, forked.pid, parents
        finally:
            await backend.close()

    code, pid, parents = asyncio.run(scenario())
    assert code == -signal.SIGKILL, "a runner whose zygote died is killed, not left untracked"
    assert pid_gone(pid)
    assert parents == [os.getpid(), os.getpid()], "later runners are spawned directly"
    warnings = [r.getMessage() for r in caplog.records if "zygote" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert str(app_env.python) in warnings[0]


@pytest.mark.slow
def test_startup_variables_and_the_off_switch_mean_direct_spawns(
        app_env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    async def parent_of(backend: LocalBackend, rid: str, env: dict[str, str]) -> int:
        try:
            _, probe = await _probe(backend, _probe_spec(app_env, tmp_path, rid, env=env))
            return int(probe["ppid"])
        finally:
            await backend.close()

    # A forked runner could not honour what the interpreter reads only at startup.
    ld = asyncio.run(parent_of(LocalBackend(), "ld", {"LD_LIBRARY_PATH": str(tmp_path)}))
    py = asyncio.run(parent_of(LocalBackend(), "py", {"PYTHONHASHSEED": "7"}))
    monkeypatch.setenv("FAL_NO_ZYGOTE", "1")
    off = asyncio.run(parent_of(LocalBackend(), "off", {}))
    assert ld == py == off == os.getpid()


def test_prewarm_never_raises_and_a_broken_zygote_never_fails_a_start(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shim = tmp_path / "shim"
    shim.write_text("#!/bin/sh\nexit 1\n")
    shim.chmod(0o755)
    false = Path("/bin/false")  # a binary that cannot be a zygote: it exits at once

    async def scenario() -> RunnerStartError:
        backend = LocalBackend()
        await backend.prewarm(shim)  # a shell shim gets no zygote, silently
        await backend.prewarm(tmp_path / "missing-python")
        await backend.prewarm(false)  # tried, fails, logged: runners spawn directly
        spec = RunnerSpec("b1", "a", "r", python=false, workdir=tmp_path,
                          payload=tmp_path / "p.pkl")
        try:
            with pytest.raises(RunnerStartError) as info:
                await backend.start(spec, RecordingEvents())
            return info.value
        finally:
            await backend.close()

    with caplog.at_level(logging.WARNING, logger="buildsvc.runtime.local"):
        error = asyncio.run(scenario())
    assert "exited with code 1 before it was ready" in str(error)
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 1 and "/bin/false" in logged[0] and "directly" in logged[0]


def test_the_zygote_refuses_to_run_by_hand() -> None:
    env = {"PATH": os.environ["PATH"]}
    done = subprocess.run([sys.executable, "-m", "buildsvc.runtime.zygote"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "FAL_ZYGOTE_FD" in done.stderr and "not by hand" in done.stderr


def test_public_surface_of_the_zygote_module() -> None:
    from buildsvc.runtime import zygote_client

    assert zygote_client.__all__ == ["ForkedProcess", "Zygote", "ZygoteUnavailable"]
