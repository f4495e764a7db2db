"""The Docker backend: each runner is a container on a Docker engine (docker-py).

A container runs the same runner agent and lifecycle as a local process (contract 3): its
command is ``buildsvc.runtime.container_control``, which joins the agent to a per-runner FIFO
directory mounted at ``/run/fal`` (fds cannot cross into a container). The agent binds
127.0.0.1 port 0 on the host network (this engine runs without a bridge) and reports the
port; the service reaches it at that port as for a local runner.

Isolation: a non-root uid, no Docker socket, every capability dropped, no-new-privileges,
memory / CPU / pids limits from the machine type (``CPU_MACHINE_SPECS``), an init process so
SIGTERM reaches the agent (Python as PID 1 would ignore it), GPUs only as device requests for
the ids the GPU allocator gave this runner, and ``<data_dir>/data`` as ``/data``, the one
shared persistent volume. App secrets arrive only as this container's environment.

Which image a runner runs is the service's knowledge: ``plan_for(spec)`` returns it (the
service's side, ``ContainerRuntime``, lives in ``runtime.containers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from buildsvc.builder.dockerfile import PAYLOAD_PATH, RUNNER_UID, VENV_PYTHON
from buildsvc.runtime.base import RunnerEvents, RunnerHandle, RunnerSpec, RunnerStartError
from buildsvc.runtime.container_control import CONTAINER_DIR, ControlFifos
from buildsvc.runtime.lifecycle import RunnerBook, TrackedRunner, consume_exception, read_control
from falcli.options import CPU_MACHINE_SPECS

__all__ = ["ContainerPlan", "DockerBackend", "container_config"]

_T = TypeVar("_T")
_LABEL = "fal.runner"
_SERVICE_LABEL = "fal.service"  # which service (data dir) started it: orphans are per service
_PIDS_LIMIT = 4096
_DRAIN_S = 1.0
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_.-]")


@dataclass(frozen=True)
class ContainerPlan:
    """What a runner's container runs: the image, its size and (direct server mode) port."""

    image: str
    machine_type: str = "XS"
    exposed_port: int | None = None
    command: list[str] | None = None  # direct server mode: the server's argv, if not the fn


def container_config(spec: RunnerSpec, plan: ContainerPlan, fifo_dir: Path, data_dir: Path,
                     *, gpu_driver: str = "nvidia") -> dict[str, Any]:
    """The keyword arguments of ``containers.create`` for this runner (pure: no engine)."""
    import docker.types

    config: dict[str, Any] = {
        "image": plan.image, "name": f"fal-runner-{_NAME_BAD.sub('-', spec.runner_id)}",
        "entrypoint": [VENV_PYTHON, "-m", "buildsvc.runtime.container_control"],
        "command": [], "environment": _environment(spec, plan),
        "user": f"{RUNNER_UID}:{RUNNER_UID}", "network_mode": "host", "init": True,
        "cap_drop": ["ALL"], "security_opt": ["no-new-privileges"],
        "pids_limit": _PIDS_LIMIT, "detach": True, "stdin_open": False, "tty": False,
        "labels": {_LABEL: spec.runner_id, "fal.app": spec.app_name,
                   "fal.revision": spec.revision_id},
        "volumes": {str(fifo_dir): {"bind": CONTAINER_DIR, "mode": "rw"},
                    str(data_dir): {"bind": "/data", "mode": "rw"}},
    }
    cpu = CPU_MACHINE_SPECS.get(plan.machine_type)
    if cpu is not None:
        config["nano_cpus"] = int(cpu[0] * 1e9)
        config["mem_limit"] = f"{cpu[1]}m"
        config["memswap_limit"] = f"{cpu[1]}m"  # no swap beyond the machine's memory
    if spec.gpu_ids:
        config["device_requests"] = [docker.types.DeviceRequest(
            driver=gpu_driver, device_ids=[str(g) for g in spec.gpu_ids],
            capabilities=[["gpu"]])]
    return config


def _environment(spec: RunnerSpec, plan: ContainerPlan) -> dict[str, str]:
    env = dict(spec.env)
    # Inside, the granted GPUs are numbered from 0, whatever their ids on the host.
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(spec.gpu_ids)))
    env.update({"FAL_RUNNER_ID": spec.runner_id, "FAL_PAYLOAD": PAYLOAD_PATH,
                "FAL_APP_KIND": spec.kind, "FAL_MAX_MULTIPLEXING": str(spec.max_multiplexing),
                "FAL_CONTROL_DIR": CONTAINER_DIR, "PYTHONUNBUFFERED": "1"})
    if plan.exposed_port is not None:
        env["FAL_EXPOSED_PORT"] = str(plan.exposed_port)
        if plan.command:
            env["FAL_EXPOSED_CMD"] = json.dumps(plan.command)
    return env


@dataclass(eq=False, kw_only=True)
class _Runner(TrackedRunner):
    fifos: ControlFifos
    container_id: str = ""
    control_task: asyncio.Task[None] | None = None


class DockerBackend(RunnerBook[_Runner]):
    """RuntimeBackend whose runners are containers (see the module docstring). ``stop``
    signals through the container's init; ``wait`` gives the exit code (137: killed)."""

    _noun = "container"

    def __init__(self, client: Any, *, data_dir: Path,
                 plan_for: Callable[[RunnerSpec], ContainerPlan],
                 gpu_driver: str = "nvidia", emulate_gpus: bool = False) -> None:
        super().__init__()
        self._client = client
        self._root = Path(data_dir).absolute()
        self._plan_for = plan_for
        self._gpu_driver = gpu_driver
        # Emulated GPUs exist only in the allocator: the engine must not be asked for them.
        self._emulate_gpus = emulate_gpus
        self._service = hashlib.sha256(str(self._root).encode()).hexdigest()[:16]
        self.shared_data = self._root / "data"
        self.shared_data.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(PermissionError):
            os.chown(self.shared_data, RUNNER_UID, RUNNER_UID)

    async def start(self, spec: RunnerSpec, events: RunnerEvents) -> RunnerHandle:
        """Create and start the container; return once the agent is IDLE."""
        runner = await self._launch(spec, events)
        port = await self._until_ready(runner)
        pid = await asyncio.to_thread(self._container_pid, runner.container_id)
        return RunnerHandle(spec.runner_id, f"http://127.0.0.1:{port}", pid)

    async def close(self) -> None:
        """Stop every runner, each with its own grace period."""
        await asyncio.gather(*(self.stop(RunnerHandle(rid, "", 0))
                               for rid in list(self._runners)))

    def remove_orphans(self) -> int:
        """Remove containers a previous run of this service (same data dir) left; how many."""
        labels = [_LABEL, f"{_SERVICE_LABEL}={self._service}"]
        stale = self._client.containers.list(all=True, filters={"label": labels})
        for container in stale:
            container.remove(force=True)
        return len(stale)

    async def _launch(self, spec: RunnerSpec, events: RunnerEvents) -> _Runner:
        if self._emulate_gpus:
            spec = dataclasses.replace(spec, gpu_ids=[])
        fifo_dir = self._root / "runners" / _NAME_BAD.sub("-", spec.runner_id)
        fifos = ControlFifos(fifo_dir, RUNNER_UID)
        runner = _Runner(spec, events, asyncio.get_running_loop().create_future(), fifos=fifos)
        runner.ready.add_done_callback(consume_exception)
        runner.control_task = asyncio.create_task(self._read_control(runner, fifos))
        fifos.hold_lifeline()
        try:
            config = container_config(spec, self._plan_for(spec), fifo_dir, self.shared_data,
                                      gpu_driver=self._gpu_driver)
            config["labels"][_SERVICE_LABEL] = self._service
            runner.container_id = await asyncio.to_thread(self._create, config)
        except Exception as exc:
            runner.control_task.cancel()
            self._cleanup(runner)
            if isinstance(exc, RunnerStartError):  # plan_for's own, already explained
                raise
            raise RunnerStartError(spec.runner_id, f"the engine refused the container: {exc}; "
                                   "check the image exists and the engine is up") from exc
        self._runners[spec.runner_id] = runner
        self._follow(runner)
        return runner

    def _create(self, config: dict[str, Any]) -> str:
        with contextlib.suppress(Exception):  # a container of that name from a crashed run
            self._client.api.remove_container(config["name"], force=True)
        container = self._client.containers.create(**config)
        container.start()
        return str(container.id)

    def _follow(self, runner: _Runner) -> None:
        loop = asyncio.get_running_loop()
        _in_thread(loop, lambda: self._pump_logs(loop, runner))
        waited = _in_thread(loop, lambda: self._client.api.wait(runner.container_id))
        runner.exited = asyncio.ensure_future(self._on_exit(runner, waited))

    def _pump_logs(self, loop: asyncio.AbstractEventLoop, runner: _Runner) -> None:
        stream = self._client.api.attach(runner.container_id, stdout=True, stderr=True,
                                         stream=True, logs=True, demux=True)
        pending = {"stdout": "", "stderr": ""}
        for out, err in stream:
            for name, chunk in (("stdout", out), ("stderr", err)):
                if chunk:
                    pending[name] += chunk.decode("utf-8", "replace")
                    *lines, pending[name] = pending[name].split("\n")
                    for line in lines:
                        _post(loop, self._on_log, runner, name, line)
        for name, rest in pending.items():
            if rest:
                _post(loop, self._on_log, runner, name, rest)

    def _on_log(self, runner: _Runner, stream: str, line: str) -> None:
        runner.log(stream, line.rstrip("\r"))

    async def _read_control(self, runner: _Runner, fifos: ControlFifos) -> None:
        await read_control(runner, fifos.open_control())

    async def _on_exit(self, runner: _Runner, waited: asyncio.Future[Any]) -> int:
        try:
            code = int((await waited).get("StatusCode", -1))
        except Exception:  # the engine lost the container: treat it as killed
            code = 137
        runner.fifos.close()  # our writer too: the control reader drains, then sees EOF
        if runner.control_task is not None:
            await asyncio.wait([runner.control_task], timeout=_DRAIN_S)
        self._record_exit(runner, code)
        await asyncio.to_thread(self._remove, runner)
        return code

    def _remove(self, runner: _Runner) -> None:
        with contextlib.suppress(Exception):
            self._client.api.remove_container(runner.container_id, force=True)
        self._cleanup(runner)
        self._runners.pop(runner.spec.runner_id, None)

    def _cleanup(self, runner: _Runner) -> None:
        runner.fifos.close()  # also ends the control reader (no writer left)
        shutil.rmtree(runner.fifos.directory, ignore_errors=True)

    def _running(self, runner: _Runner) -> bool:
        return runner.exited is not None and not runner.exited.done()

    async def _sigterm(self, runner: _Runner) -> None:
        await asyncio.to_thread(self._signal, runner, "SIGTERM")

    async def _kill(self, runner: _Runner) -> None:
        runner.stopping = True
        if runner.exited is None:
            return
        if not runner.exited.done():
            await asyncio.to_thread(self._signal, runner, "SIGKILL")
        await asyncio.shield(runner.exited)

    def _signal(self, runner: _Runner, sig: str) -> None:
        with contextlib.suppress(Exception):  # already gone: the exit watcher reports it
            self._client.api.kill(runner.container_id, signal=sig)

    def _container_pid(self, container_id: str) -> int:
        with contextlib.suppress(Exception):
            return int(self._client.api.inspect_container(container_id)["State"]["Pid"])
        return 0


def _in_thread(loop: asyncio.AbstractEventLoop, fn: Callable[[], _T]) -> asyncio.Future[_T]:
    """Run a long blocking call in its own thread (the default pool is small: 2 cores)."""
    future: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting task
            _post(loop, settle, None, exc)
        else:
            _post(loop, settle, result, None)

    threading.Thread(target=run, name="fal-docker", daemon=True).start()
    future.add_done_callback(consume_exception)
    return future


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed while a thread still ran
        loop.call_soon_threadsafe(fn, *args)
