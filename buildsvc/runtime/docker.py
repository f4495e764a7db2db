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

Which image a runner runs is the service's knowledge: ``plan_for(spec)`` returns it.

``ContainerRuntime`` is the service's whole Docker side behind one object, connected lazily
(a local-runtime server touches the engine only when an app with an ``image`` arrives): the
engine client, the ``ImageBuilder`` (plus the optional push to a registry) and the
``DockerBackend``, for which it is itself a ``RuntimeBackend``. ``plan_for`` reads the image,
machine type and exposed port off the runner's revision.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from buildsvc.builder.dockerfile import PAYLOAD_PATH, RUNNER_UID, VENV_PYTHON
from buildsvc.builder.image import ImageBuilder, ImageBuildError
from buildsvc.runtime.base import (
    RunnerEvents,
    RunnerHandle,
    RunnerSpec,
    RunnerStartError,
    RunnerState,
)
from buildsvc.runtime.container_control import CONTAINER_DIR, ControlFifos
from falcli.options import CPU_MACHINE_SPECS

__all__ = ["ContainerPlan", "ContainerRuntime", "DockerBackend", "EngineUnavailable",
           "container_config"]

_T = TypeVar("_T")
_LABEL = "fal.runner"
_SERVICE_LABEL = "fal.service"  # which service (data dir) started it: orphans are per service
_ENGINE_TIMEOUT_S = 120
_PIDS_LIMIT = 4096
_STDERR_TAIL = 40
_LINE_LIMIT = 1 << 20
_DRAIN_S = 1.0
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_.-]")


class EngineUnavailable(Exception):
    """No Docker engine answers; the message names what was tried and the fix."""


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


@dataclass(eq=False)
class _Runner:
    spec: RunnerSpec
    events: RunnerEvents
    fifos: ControlFifos
    ready: asyncio.Future[int]
    container_id: str = ""
    state: RunnerState = RunnerState.PENDING
    stopping: bool = False
    stderr_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=_STDERR_TAIL))
    exited: asyncio.Future[int] | None = None
    stop_task: asyncio.Task[None] | None = None
    control_task: asyncio.Task[None] | None = None

    def tail(self) -> str:
        return "\n".join(self.stderr_tail)


class DockerBackend:
    """RuntimeBackend whose runners are containers (see the module docstring)."""

    def __init__(self, client: Any, *, data_dir: Path,
                 plan_for: Callable[[RunnerSpec], ContainerPlan],
                 gpu_driver: str = "nvidia", emulate_gpus: bool = False) -> None:
        self._client = client
        self._root = Path(data_dir).absolute()
        self._plan_for = plan_for
        self._gpu_driver = gpu_driver
        # Emulated GPUs exist only in the allocator: the engine must not be asked for them.
        self._emulate_gpus = emulate_gpus
        self._service = hashlib.sha256(str(self._root).encode()).hexdigest()[:16]
        self._runners: dict[str, _Runner] = {}
        self._exit_codes: dict[str, int] = {}
        self.shared_data = self._root / "data"
        self.shared_data.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(PermissionError):
            os.chown(self.shared_data, RUNNER_UID, RUNNER_UID)

    async def start(self, spec: RunnerSpec, events: RunnerEvents) -> RunnerHandle:
        """Create and start the container; return once the agent is IDLE."""
        runner = await self._launch(spec, events)
        try:
            port = await asyncio.wait_for(asyncio.shield(runner.ready), spec.startup_timeout)
        except TimeoutError:
            await self._kill(runner)
            raise RunnerStartError(
                spec.runner_id, f"not ready within startup_timeout = {spec.startup_timeout:g} "
                "seconds; make setup() faster or raise startup_timeout", runner.tail()) from None
        except BaseException:
            await self._kill(runner)
            raise
        pid = await asyncio.to_thread(self._container_pid, runner.container_id)
        return RunnerHandle(spec.runner_id, f"http://127.0.0.1:{port}", pid)

    async def stop(self, handle: RunnerHandle, grace_period: float | None = None) -> None:
        """SIGTERM (through the init), wait up to the grace period, then SIGKILL."""
        runner = self._runners.get(handle.runner_id)
        if runner is None:
            return
        grace = runner.spec.grace_period if grace_period is None else grace_period
        if runner.stop_task is None:
            runner.stop_task = asyncio.create_task(self._terminate(runner, grace))
        await asyncio.shield(runner.stop_task)

    async def wait(self, handle: RunnerHandle) -> int:
        """Wait for the container to exit; its exit code (137: killed)."""
        runner = self._runners.get(handle.runner_id)
        if runner is not None and runner.exited is not None:
            return await asyncio.shield(runner.exited)
        if handle.runner_id in self._exit_codes:
            return self._exit_codes[handle.runner_id]
        raise KeyError(f"runner {handle.runner_id!r} was not started by this backend")

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
        runner = _Runner(spec, events, fifos, asyncio.get_running_loop().create_future())
        runner.ready.add_done_callback(_consume_exception)
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
        line = line.rstrip("\r")
        if stream == "stderr":
            runner.stderr_tail.append(line)
        runner.events.on_log(runner.spec.runner_id, stream, line)

    async def _read_control(self, runner: _Runner, fifos: ControlFifos) -> None:
        reader = asyncio.StreamReader(limit=_LINE_LIMIT)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fifos.open_control(), "rb", 0))
        try:
            async for raw in reader:
                self._on_control(runner, raw)
        finally:
            transport.close()

    def _on_control(self, runner: _Runner, raw: bytes) -> None:
        try:
            message = json.loads(raw)
            state = RunnerState(message["state"])
        except (ValueError, KeyError, TypeError):
            runner.stderr_tail.append(f"[agent] bad control message: {raw[:200]!r}")
            return
        runner.state = state
        detail = str(message.get("error", ""))
        runner.events.on_state(runner.spec.runner_id, state, detail)
        if runner.ready.done():
            return
        if state is RunnerState.IDLE:
            runner.ready.set_result(int(message["port"]))
        elif state is RunnerState.FAILED:
            runner.ready.set_exception(RunnerStartError(
                runner.spec.runner_id, "the app failed during startup (see its traceback)",
                detail or runner.tail()))

    async def _on_exit(self, runner: _Runner, waited: asyncio.Future[Any]) -> int:
        try:
            code = int((await waited).get("StatusCode", -1))
        except Exception:  # the engine lost the container: treat it as killed
            code = 137
        runner.fifos.close()  # our writer too: the control reader drains, then sees EOF
        if runner.control_task is not None:
            await asyncio.wait([runner.control_task], timeout=_DRAIN_S)
        self._report_exit(runner, code)
        await asyncio.to_thread(self._remove, runner)
        return code

    def _report_exit(self, runner: _Runner, code: int) -> None:
        rid = runner.spec.runner_id
        if not runner.ready.done():
            runner.ready.set_exception(RunnerStartError(
                rid, f"the container exited with code {code} before it was ready",
                runner.tail()))
        elif runner.state not in (RunnerState.TERMINATED, RunnerState.FAILED):
            state = RunnerState.TERMINATED if runner.stopping else RunnerState.FAILED
            detail = f"exited with code {code}" + (f"; last stderr:\n{runner.tail()}"
                                                   if state is RunnerState.FAILED else "")
            runner.state = state
            runner.events.on_state(rid, state, detail)
        self._exit_codes[rid] = code

    def _remove(self, runner: _Runner) -> None:
        with contextlib.suppress(Exception):
            self._client.api.remove_container(runner.container_id, force=True)
        self._cleanup(runner)
        self._runners.pop(runner.spec.runner_id, None)

    def _cleanup(self, runner: _Runner) -> None:
        runner.fifos.close()  # also ends the control reader (no writer left)
        shutil.rmtree(runner.fifos.directory, ignore_errors=True)

    async def _terminate(self, runner: _Runner, grace: float) -> None:
        runner.stopping = True
        assert runner.exited is not None
        if not runner.exited.done():
            await asyncio.to_thread(self._signal, runner, "SIGTERM")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(runner.exited), grace)
        await self._kill(runner)

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
    future.add_done_callback(_consume_exception)
    return future


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed while a thread still ran
        loop.call_soon_threadsafe(fn, *args)


def _consume_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class ContainerRuntime:
    """The service's Docker side, connected on first use (see the module docstring).

    ``everything``: every app runs in an image (``--runtime docker``); otherwise only apps
    with an ``image`` option do. ``revision_of(id)`` is the store's revision lookup.
    """

    def __init__(self, data_dir: Path, *, blob_path: Callable[[str], Path],
                 revision_of: Callable[[str], Any], everything: bool = False,
                 cpu_base: str = "fal-base-cpu:bookworm", gpu_base: str = "fal-base-gpu:bookworm",
                 registry: str | None = None, emulate_gpus: bool = False,
                 connect: Callable[[], Any] | None = None) -> None:
        self._root = Path(data_dir).absolute()
        self._blob_path = blob_path
        self._revision_of = revision_of
        self._everything = everything
        self._bases = (cpu_base, gpu_base)
        self._registry = registry.rstrip("/") if registry else None
        self._emulate_gpus = emulate_gpus
        self._connect = connect or _engine
        self._lock = threading.Lock()
        self._client: Any = None
        self._builder: ImageBuilder | None = None
        self._backend: DockerBackend | None = None

    def wanted(self, manifest: Mapping[str, Any]) -> bool:
        """Whether this app runs in an image (its deploy builds one)."""
        return self._everything or bool(manifest.get("options", {}).get("image"))

    def connect(self) -> None:
        """Reach the engine (blocking), then remove this service's orphaned containers."""
        with self._lock:
            if self._client is not None:
                return
            client = self._connect()
            self._builder = ImageBuilder(
                self._root / "images", client=client, blob_path=self._blob_path,
                cpu_base=self._bases[0], gpu_base=self._bases[1])
            self._backend = DockerBackend(client, data_dir=self._root, plan_for=self.plan_for,
                                          emulate_gpus=self._emulate_gpus)
            self._backend.remove_orphans()
            self._client = client

    async def ensure_image(self, manifest: Mapping[str, Any], *, no_cache: bool = False,
                           log: Callable[[str], None]) -> str:
        """The image tag of ``manifest``, built only if missing, pushed if a registry is set."""
        await asyncio.to_thread(self.connect)
        assert self._builder is not None
        built = await self._builder.ensure(manifest, no_cache=no_cache, log=log)
        log(f"image {built.tag} " + ("built" if built.built else "is up to date: no build"))
        if self._registry:
            await asyncio.to_thread(self._push, built.tag, log)
        return built.tag

    def plan_for(self, spec: RunnerSpec) -> ContainerPlan:
        revision = self._revision_of(spec.revision_id)
        if revision is None or not getattr(revision, "image", ""):
            raise RunnerStartError(spec.runner_id, f"revision {spec.revision_id} has no image; "
                                   "deploy the app again to build one")
        options = revision.manifest.get("options", {})
        types = options.get("machine_type") or ["XS"]
        machine = types if isinstance(types, str) else types[0]
        return ContainerPlan(revision.image, machine, options.get("exposed_port"),
                             _command(options.get("image")))

    # RuntimeBackend: runners of revisions that have an image

    async def start(self, spec: RunnerSpec, events: RunnerEvents) -> RunnerHandle:
        try:
            await asyncio.to_thread(self.connect)
        except EngineUnavailable as exc:
            raise RunnerStartError(spec.runner_id, str(exc)) from None
        assert self._backend is not None
        return await self._backend.start(spec, events)

    async def stop(self, handle: RunnerHandle, grace_period: float | None = None) -> None:
        if self._backend is not None:
            await self._backend.stop(handle, grace_period)

    async def wait(self, handle: RunnerHandle) -> int:
        assert self._backend is not None, "wait() before start()"
        return await self._backend.wait(handle)

    async def close(self) -> None:
        """Stop every container runner, then let go of the engine."""
        if self._backend is not None:
            await self._backend.close()
        if self._client is not None:
            self._client.close()

    def _push(self, tag: str, log: Callable[[str], None]) -> None:
        assert self._client is not None
        target = f"{self._registry}/{tag}"
        repository, _, reference = target.rpartition(":")
        self._client.images.get(tag).tag(repository, reference)
        log(f"pushing {target}")
        try:
            stream = self._client.api.push(repository, tag=reference, stream=True, decode=True)
            errors = [str(chunk["error"]) for chunk in stream if "error" in chunk]
        except Exception as exc:  # the engine refused before streaming (bad name, no auth)
            errors = [str(exc)]
        if errors:
            raise ImageBuildError(
                f"pushing {target} failed: {errors[0]}; check that --registry {self._registry} "
                "is reachable from the engine and that it is logged in there",
                step=f"push {target}", detail="\n".join(errors))
        log(f"pushed {target}")


def _command(image: Mapping[str, Any] | None) -> list[str] | None:
    """``ContainerImage`` entrypoint + cmd as one argv (a string is split like a shell)."""
    argv: list[str] = []
    for key in ("entrypoint", "cmd"):
        value = (image or {}).get(key)
        argv += shlex.split(value) if isinstance(value, str) else list(value or [])
    return argv or None


def _engine() -> Any:
    import docker

    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env(timeout=_ENGINE_TIMEOUT_S)
        client.ping()
    except Exception as exc:  # DockerException, or requests' own on a half-open socket
        raise EngineUnavailable(
            f"no Docker engine answers at {where} ({exc}); start one (bash "
            "scripts/docker-setup.sh) and restart the server with docker available, or "
            "deploy apps without an image on --runtime local") from None
    return client
