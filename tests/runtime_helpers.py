"""Shared helpers for the runtime tests: a recording uv runner, event sinks, waiting."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from buildsvc.builder.env import Env, EnvBuilder, LogFn, run_uv
from buildsvc.runtime.base import RunnerSpec, RunnerState

__all__ = [
    "TINY_APP",
    "RecordingEvents",
    "RecordingUv",
    "app_env",
    "make_sdist",
    "pickle_app",
    "pid_gone",
    "runner_spec",
    "wait_until",
]

OWN_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"

# One app for every runner test; its behaviour is switched by environment variables
# (RunnerSpec.env) and it leaves marker files in $MARKS so tests can see what ran.
TINY_APP = """
import asyncio, os, subprocess, sys, time
from pathlib import Path

import fal

CHILD = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"


def _mark(name, text=""):
    with open(Path(os.environ["MARKS"]) / name, "a") as f:
        f.write(text)


class TinyApp(fal.App):
    def setup(self):
        print("setup running", flush=True)
        if os.environ.get("FAIL_SETUP"):
            raise RuntimeError("setup exploded on purpose")
        time.sleep(float(os.environ.get("SLOW_SETUP", "0")))
        if os.environ.get("SPAWN_CHILD"):
            child = subprocess.Popen([sys.executable, "-c", CHILD])
            _mark("child.pid", str(child.pid))

    @fal.endpoint("/")
    def hello(self, name: str = "world") -> dict:
        return {
            "hello": name,
            "state": os.environ.get("FAL_RUNNER_STATE"),
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "secret": os.environ.get("FAL_TEST_SERVICE_SECRET"),
        }

    @fal.endpoint("/slow")
    async def slow(self, seconds: float) -> dict:
        _mark("slow-started")
        await asyncio.sleep(seconds)
        return {"slept": seconds}

    def handle_exit(self):
        _mark("hooks", "handle_exit " + os.environ.get("FAL_RUNNER_STATE", "") + "\\n")

    def teardown(self):
        _mark("hooks", "teardown\\n")
"""

_module_ids = itertools.count()


def pickle_app(directory: Path, source: str = TINY_APP, name: str = "TinyApp") -> Path:
    """Write ``source`` as a module, cloudpickle ``name`` by value (as packaging does)."""
    directory.mkdir(parents=True, exist_ok=True)
    module_name = f"runtime_test_app_{next(_module_ids)}"
    path = directory / f"{module_name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    cloudpickle.register_pickle_by_value(module)
    payload = directory / "payload.pkl"
    payload.write_bytes(cloudpickle.dumps(getattr(module, name)))
    path.unlink()  # the runner must get the class from the payload, not from the file
    return payload


_built: list[Env] = []


@pytest.fixture(scope="module")
def app_env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    """A real env (no requirements) built by the real builder, once per test session."""
    if not _built:
        root = tmp_path_factory.mktemp("runtime-envs")
        builder = EnvBuilder(root, blob_path=lambda sha: root / sha)
        _built.append(asyncio.run(builder.ensure(OWN_PYTHON, [])))
    return _built[0]


def runner_spec(built: Env, tmp: Path, runner_id: str = "r1", **overrides: Any) -> RunnerSpec:
    """A RunnerSpec for TINY_APP in ``built``; ``marks`` dir at ``tmp / "marks"``."""
    marks = tmp / "marks"
    marks.mkdir(parents=True, exist_ok=True)
    extra_env = {"MARKS": str(marks), **overrides.pop("env", {})}
    fields: dict[str, Any] = {
        "runner_id": runner_id, "app_name": "tiny", "revision_id": "rev1",
        "python": built.python, "workdir": tmp, "payload": pickle_app(tmp / "bundle"),
        "startup_timeout": 60.0, "grace_period": 5.0, "env": extra_env,
    }
    fields.update(overrides)
    return RunnerSpec(**fields)


class RecordingUv:
    """The real uv runner, recording every invocation (the builder's ``runner=`` seam)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def __call__(self, argv: list[str], env: dict[str, str], log: LogFn
                       ) -> tuple[int, str]:
        self.calls.append(argv)
        return await run_uv(argv, env, log)


class RecordingEvents:
    """A RunnerEvents that keeps everything it is told."""

    def __init__(self) -> None:
        self.states: list[tuple[str, RunnerState, str]] = []
        self.logs: list[tuple[str, str, str]] = []

    def on_state(self, runner_id: str, state: RunnerState, detail: str = "") -> None:
        self.states.append((runner_id, state, detail))

    def on_log(self, runner_id: str, stream: str, line: str) -> None:
        self.logs.append((runner_id, stream, line))

    def state_names(self) -> list[str]:
        return [str(s) for _, s, _ in self.states]

    def log_text(self, stream: str) -> str:
        return "\n".join(line for _, s, line in self.logs if s == stream)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.02)


def pid_gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def make_sdist(directory: Path, name: str = "tinypkg", version: str = "0.1.0") -> Path:
    """A minimal real sdist (flit_core backend) with an ``extra`` optional dependency group."""
    base = f"{name}-{version}"
    src = directory / "src" / base
    (src / name).mkdir(parents=True)
    init = f'"""tiny test package."""\n\n__version__ = "{version}"\n'
    (src / name / "__init__.py").write_text(init)
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["flit_core>=3.2,<4"]\nbuild-backend = "flit_core.buildapi"\n'
        f'[project]\nname = "{name}"\nversion = "{version}"\ndescription = "t"\n'
        "[project.optional-dependencies]\nextra = []\n")
    (src / "PKG-INFO").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    out = directory / f"{base}.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(src, arcname=base)
    os.utime(out)
    return out


# A stand-in for the service, run as `python -c STAND_IN_SERVICE SPEC_JSON`: starts one
# runner, prints its pid, its child's and its parent's (the zygote when forked), then waits
# to be killed (tests kill -9 it and check nothing is left behind).
STAND_IN_SERVICE = """
import asyncio, json, sys
from pathlib import Path
from buildsvc.runtime.base import RunnerSpec
from buildsvc.runtime.local import LocalBackend

class Quiet:
    def on_state(self, *a): pass
    def on_log(self, *a): pass

async def main():
    spec = RunnerSpec(**json.loads(sys.argv[1]))
    spec.python, spec.workdir, spec.payload = map(Path, (spec.python, spec.workdir, spec.payload))
    handle = await LocalBackend().start(spec, Quiet())
    child = (Path(spec.env["MARKS"]) / "child.pid").read_text()
    zygote = Path(f"/proc/{handle.pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    print(json.dumps({"runner": handle.pid, "child": int(child), "zygote": int(zygote)}),
          flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""
