"""The local process backend: each runner is a process group on this machine.

A runner is ``<env python> -m buildsvc.runtime.agent`` spawned directly (no shell: a shim
costs ~100 ms of cold start), in its own session, with a clean environment (never the
service's own: it may hold secrets) and two pipes: the agent's control channel (JSON lines,
contract 3) and a *lifeline* whose write end only this process holds, so a runner notices
when the service dies and takes its own group down. App code is never unpickled here.

By default a runner is not spawned but forked by its environment's *zygote* (see
``runtime.zygote``), a parent that has already imported everything a runner needs: same
process group, pipes, environment and lifeline, ~10x faster. One zygote per env interpreter,
started lazily (or ahead of time by ``prewarm``). Whenever a zygote cannot serve a start, the
runner is spawned directly instead: the zygote only ever makes starts faster, never fails them.
``LocalBackend(use_zygote=False)`` or ``FAL_NO_ZYGOTE=1`` turns it off.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from buildsvc.runtime.base import (
    RunnerEvents,
    RunnerHandle,
    RunnerSpec,
    RunnerStartError,
    RunnerState,
)
from buildsvc.runtime.zygote import Zygote, ZygoteUnavailable

__all__ = ["LocalBackend"]

# The only variables of the service's environment a runner inherits.
_PASSTHROUGH = ("PATH", "HOME", "LANG", "TMPDIR")
_STDERR_TAIL = 40
_LINE_LIMIT = 1 << 20
_DRAIN_S = 1.0  # how long to wait for log pipes after exit (a child may hold them open)
_EXIT_CODES_KEPT = 1024
# Variables read only when an interpreter starts (a forked runner would silently ignore
# them): a spec that sets one is spawned directly.
_STARTUP_VARS = ("PYTHON", "LD_", "MALLOC_", "LC_", "LANG")
_ZYGOTE_WAIT_S = 10.0  # longest a start waits for its env's zygote before spawning directly
_log = logging.getLogger(__name__)


class _Process(Protocol):
    """What the backend needs of a runner process: spawned (asyncio) or forked (zygote)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...


@dataclass(eq=False)
class _Runner:
    spec: RunnerSpec
    events: RunnerEvents
    proc: _Process
    lifeline: int  # our write end; closing it tells the agent we are gone
    ready: asyncio.Future[int]
    state: RunnerState = RunnerState.PENDING
    stopping: bool = False
    stderr_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=_STDERR_TAIL))
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    exited: asyncio.Task[int] | None = None
    stop_task: asyncio.Task[None] | None = None

    def tail(self) -> str:
        return "\n".join(self.stderr_tail)


class LocalBackend:
    """RuntimeBackend that runs runners as local processes."""

    def __init__(self, use_zygote: bool = True) -> None:
        self._runners: dict[str, _Runner] = {}
        self._exit_codes: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._use_zygote = use_zygote and os.environ.get("FAL_NO_ZYGOTE") != "1"
        self._zygotes: dict[Path, asyncio.Task[Zygote]] = {}
        self._no_zygote: set[Path] = set()  # envs whose runners are spawned directly
        self._retiring: set[asyncio.Task[None]] = set()  # zygotes given up on, closing

    async def start(self, spec: RunnerSpec, events: RunnerEvents) -> RunnerHandle:
        """Spawn a runner; return once it is IDLE, or kill it and raise RunnerStartError."""
        runner = await self._spawn(spec, events)
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
        return RunnerHandle(spec.runner_id, f"http://127.0.0.1:{port}", runner.proc.pid)

    async def stop(self, handle: RunnerHandle, grace_period: float | None = None) -> None:
        """SIGTERM, wait up to the grace period, then SIGKILL the whole group. Idempotent."""
        runner = self._runners.get(handle.runner_id)
        if runner is None:
            return
        grace = runner.spec.grace_period if grace_period is None else grace_period
        if runner.stop_task is None:
            runner.stop_task = asyncio.create_task(self._terminate(runner, grace))
        await asyncio.shield(runner.stop_task)

    async def wait(self, handle: RunnerHandle) -> int:
        """Wait for the runner to exit; its exit code (negative: killed by that signal)."""
        runner = self._runners.get(handle.runner_id)
        if runner is not None and runner.exited is not None:
            return await asyncio.shield(runner.exited)
        if handle.runner_id in self._exit_codes:
            return self._exit_codes[handle.runner_id]
        raise KeyError(f"runner {handle.runner_id!r} was not started by this backend")

    async def prewarm(self, python: Path) -> None:
        """Start the zygote of the env whose interpreter is ``python`` now, so that even the
        first runner forks fast. Never raises: without a zygote, starts spawn directly."""
        if self._use_zygote and _is_interpreter(python):
            await self._zygote(python)

    async def close(self) -> None:
        """Stop every runner (each with its own grace period), then every zygote."""
        handles = [RunnerHandle(r.spec.runner_id, "", r.proc.pid)
                   for r in self._runners.values()]
        await asyncio.gather(*(self.stop(h) for h in handles))
        starting = list(self._zygotes.values())
        self._zygotes.clear()
        for result in await asyncio.gather(*starting, return_exceptions=True):
            if isinstance(result, Zygote):
                await result.close()
        await asyncio.gather(*self._retiring)

    async def _spawn(self, spec: RunnerSpec, events: RunnerEvents) -> _Runner:
        wait = min(_ZYGOTE_WAIT_S, spec.startup_timeout / 2)
        zygote = await self._zygote(spec.python, wait) if self._zygote_fits(spec) else None
        if zygote is not None:
            try:
                return await self._fork(zygote, spec, events)
            except ZygoteUnavailable as exc:
                if exc.fatal:
                    self._give_up(spec.python, str(exc))
            except Exception as exc:  # a zygote bug must never cost a start
                self._give_up(spec.python, repr(exc))
        return await self._spawn_direct(spec, events)

    def _zygote_fits(self, spec: RunnerSpec) -> bool:
        return (self._use_zygote and spec.python not in self._no_zygote
                and spec.workdir.is_dir() and _is_interpreter(spec.python)
                and not any(k.startswith(_STARTUP_VARS) for k in spec.env))

    async def _zygote(self, python: Path, wait: float | None = None) -> Zygote | None:
        """The env's zygote, started on first use; None if it is not ready within ``wait``
        seconds (it goes on starting, for later runners) or cannot be had (logged once)."""
        if python in self._no_zygote:
            return None
        task = self._zygotes.get(python)
        if task is None:
            task = self._zygotes[python] = asyncio.create_task(
                Zygote.spawn(python, _zygote_env(python), _env_root(python)))
        try:
            zygote = await asyncio.wait_for(asyncio.shield(task), wait)
        except TimeoutError:
            return None
        except Exception as exc:  # ZygoteUnavailable, or a zygote bug: never fail a start
            self._give_up(python, str(exc) if isinstance(exc, ZygoteUnavailable) else repr(exc))
            return None
        if not zygote.alive:
            self._give_up(python, f"the zygote (pid {zygote.pid}) died")
            return None
        return zygote

    def _give_up(self, python: Path, reason: str) -> None:
        if python in self._no_zygote:
            return
        self._no_zygote.add(python)
        task = self._zygotes.pop(python, None)
        if task is not None and task.done() and not task.exception():
            retiring = asyncio.ensure_future(task.result().close())
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)
        _log.warning("runner zygote for %s unavailable (%s); spawning its runners directly, "
                     "with slower cold starts", python, reason)

    async def _fork(self, zygote: Zygote, spec: RunnerSpec, events: RunnerEvents) -> _Runner:
        (control_r, control_w), (lifeline_r, lifeline_w) = os.pipe(), os.pipe()
        (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe()
        try:
            proc = await zygote.fork(spec.runner_id, spec.workdir, _runner_env(spec),
                                     [control_w, lifeline_r, out_w, err_w])
        except BaseException:
            for fd in (control_r, lifeline_w, out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (control_w, lifeline_r, out_w, err_w):
                os.close(fd)
        return self._track(spec, events, proc, control_r, lifeline_w, (out_r, err_r))

    async def _spawn_direct(self, spec: RunnerSpec, events: RunnerEvents) -> _Runner:
        control_r, control_w = os.pipe()
        lifeline_r, lifeline_w = os.pipe()
        env = {**_runner_env(spec), "FAL_AGENT_CONTROL_FD": str(control_w),
               "FAL_AGENT_LIFELINE_FD": str(lifeline_r)}
        try:
            proc = await asyncio.create_subprocess_exec(
                str(spec.python), "-m", "buildsvc.runtime.agent",
                cwd=spec.workdir, env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, pass_fds=(control_w, lifeline_r),
                start_new_session=True, limit=_LINE_LIMIT)
        except OSError as exc:
            for fd in (control_r, lifeline_w):
                os.close(fd)
            raise RunnerStartError(spec.runner_id, f"cannot execute {spec.python} in "
                                   f"{spec.workdir}: {exc}; rebuild the app's environment "
                                   "(deploy again)") from exc
        finally:
            os.close(control_w)
            os.close(lifeline_r)
        assert proc.stdout is not None and proc.stderr is not None
        return self._track(spec, events, proc, control_r, lifeline_w, (proc.stdout, proc.stderr))

    def _track(self, spec: RunnerSpec, events: RunnerEvents, proc: _Process, control_r: int,
               lifeline_w: int, outputs: tuple[_Output, _Output]) -> _Runner:
        loop = asyncio.get_running_loop()
        runner = _Runner(spec, events, proc, lifeline_w, loop.create_future())
        runner.ready.add_done_callback(_consume_exception)
        runner.tasks = [
            asyncio.create_task(self._read_control(runner, control_r)),
            asyncio.create_task(_pump(runner, outputs[0], "stdout")),
            asyncio.create_task(_pump(runner, outputs[1], "stderr")),
        ]
        runner.exited = asyncio.create_task(self._watch_exit(runner))
        self._runners[spec.runner_id] = runner
        return runner

    async def _read_control(self, runner: _Runner, fd: int) -> None:
        reader, transport = await _open_pipe(fd)
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

    async def _watch_exit(self, runner: _Runner) -> int:
        code = await runner.proc.wait()
        _killpg(runner.proc.pid, signal.SIGKILL)  # children the app left behind
        await asyncio.wait(runner.tasks, timeout=_DRAIN_S)
        os.close(runner.lifeline)
        self._on_exit(runner, code)
        return code

    def _on_exit(self, runner: _Runner, code: int) -> None:
        rid = runner.spec.runner_id
        if not runner.ready.done():
            runner.ready.set_exception(RunnerStartError(
                rid, f"the runner exited with code {code} before it was ready", runner.tail()))
        elif runner.state not in (RunnerState.TERMINATED, RunnerState.FAILED):
            state = RunnerState.TERMINATED if runner.stopping else RunnerState.FAILED
            detail = f"exited with code {code}" + (f"; last stderr:\n{runner.tail()}"
                                                   if state is RunnerState.FAILED else "")
            runner.state = state
            runner.events.on_state(rid, state, detail)
        self._runners.pop(rid, None)
        self._exit_codes[rid] = code
        while len(self._exit_codes) > _EXIT_CODES_KEPT:
            self._exit_codes.popitem(last=False)

    async def _terminate(self, runner: _Runner, grace: float) -> None:
        runner.stopping = True
        assert runner.exited is not None
        if runner.proc.returncode is None:
            _killpg(runner.proc.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(runner.exited), grace)
        await self._kill(runner)

    async def _kill(self, runner: _Runner) -> None:
        runner.stopping = True
        _killpg(runner.proc.pid, signal.SIGKILL)
        assert runner.exited is not None
        await asyncio.shield(runner.exited)
        self._runners.pop(runner.spec.runner_id, None)


_Output = asyncio.StreamReader | int  # a spawned runner's pipe, or our end of a forked one's


async def _open_pipe(fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    reader = asyncio.StreamReader(limit=_LINE_LIMIT)
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
    return reader, transport


async def _pump(runner: _Runner, output: _Output, name: str) -> None:
    if isinstance(output, asyncio.StreamReader):
        await _pump_lines(runner, output, name)
        return
    stream, transport = await _open_pipe(output)
    try:
        await _pump_lines(runner, stream, name)
    finally:
        transport.close()


async def _pump_lines(runner: _Runner, stream: asyncio.StreamReader, name: str) -> None:
    """Forward a runner's output, line by line, to its events (and keep a stderr tail)."""
    while True:
        try:
            raw = await stream.readline()
        except ValueError:  # a line over the limit: uvicorn already dropped it; go on
            continue
        if not raw:
            return
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if name == "stderr":
            runner.stderr_tail.append(line)
        runner.events.on_log(runner.spec.runner_id, name, line)


def _base_env(python: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in _PASSTHROUGH if k in os.environ}
    env["PATH"] = os.pathsep.join(filter(None, [str(python.parent), env.get("PATH")]))
    if (python.parent.parent / "pyvenv.cfg").exists():
        env["VIRTUAL_ENV"] = str(python.parent.parent)
    return env


def _zygote_env(python: Path) -> dict[str, str]:
    # The zygote sees no GPU and no secret: each runner gets its own env after the fork.
    return {**_base_env(python), "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


def _env_root(python: Path) -> Path:
    """The zygote's cwd: inside the env, so leftover checks on the data dir see it."""
    root = python.parent.parent
    return root if (root / "pyvenv.cfg").exists() else python.parent


def _is_interpreter(python: Path) -> bool:
    """A binary, not a shell shim: a shim would not run ``-m buildsvc.runtime.zygote``."""
    try:
        with open(python, "rb") as f:
            return f.read(2) != b"#!"
    except OSError:
        return False


def _runner_env(spec: RunnerSpec) -> dict[str, str]:
    """The runner's whole environment, but for the fds (numbered by whoever starts it)."""
    env = _base_env(spec.python)
    env.update(spec.env)
    # Without an allocation a runner sees no GPU at all, rather than every GPU.
    if spec.gpu_ids or "CUDA_VISIBLE_DEVICES" not in spec.env:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in spec.gpu_ids)
    env.update({
        "FAL_RUNNER_ID": spec.runner_id,
        "FAL_PAYLOAD": str(spec.payload.absolute()),
        "FAL_APP_KIND": spec.kind,
        "FAL_MAX_MULTIPLEXING": str(spec.max_multiplexing),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _consume_exception(future: asyncio.Future[int]) -> None:
    # start() re-raises it; this only keeps asyncio from warning when nobody awaited.
    if not future.cancelled():
        future.exception()
