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
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from buildsvc.runtime.base import RunnerEvents, RunnerHandle, RunnerSpec, RunnerStartError
from buildsvc.runtime.lifecycle import (
    LINE_LIMIT,
    RunnerBook,
    TrackedRunner,
    consume_exception,
    open_pipe,
    read_control,
)
from buildsvc.runtime.zygote_client import Zygote, ZygoteUnavailable

__all__ = ["LocalBackend"]

# The only variables of the service's environment a runner inherits.
_PASSTHROUGH = ("PATH", "HOME", "LANG", "TMPDIR")
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


@dataclass(eq=False, kw_only=True)
class _Runner(TrackedRunner):
    proc: _Process
    lifeline: int  # our write end; closing it tells the agent we are gone
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class LocalBackend(RunnerBook[_Runner]):
    """RuntimeBackend that runs runners as local processes. ``stop`` signals the whole
    process group; ``wait`` gives the exit code (negative: killed by that signal)."""

    def __init__(self, use_zygote: bool = True) -> None:
        super().__init__(exit_codes_kept=_EXIT_CODES_KEPT)
        self._use_zygote = use_zygote and os.environ.get("FAL_NO_ZYGOTE") != "1"
        self._zygotes: dict[Path, asyncio.Task[Zygote]] = {}
        self._no_zygote: set[Path] = set()  # envs whose runners are spawned directly
        self._retiring: set[asyncio.Task[None]] = set()  # zygotes given up on, closing

    async def start(self, spec: RunnerSpec, events: RunnerEvents) -> RunnerHandle:
        """Spawn a runner; return once it is IDLE, or kill it and raise RunnerStartError."""
        runner = await self._spawn(spec, events)
        port = await self._until_ready(runner)
        return RunnerHandle(spec.runner_id, f"http://127.0.0.1:{port}", runner.proc.pid)

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
                start_new_session=True, limit=LINE_LIMIT)
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
        runner = _Runner(spec, events, loop.create_future(), proc=proc, lifeline=lifeline_w)
        runner.ready.add_done_callback(consume_exception)
        runner.tasks = [
            asyncio.create_task(read_control(runner, control_r)),
            asyncio.create_task(_pump(runner, outputs[0], "stdout")),
            asyncio.create_task(_pump(runner, outputs[1], "stderr")),
        ]
        runner.exited = asyncio.create_task(self._watch_exit(runner))
        self._runners[spec.runner_id] = runner
        return runner

    async def _watch_exit(self, runner: _Runner) -> int:
        code = await runner.proc.wait()
        _killpg(runner.proc.pid, signal.SIGKILL)  # children the app left behind
        await asyncio.wait(runner.tasks, timeout=_DRAIN_S)
        os.close(runner.lifeline)
        self._record_exit(runner, code)
        self._runners.pop(runner.spec.runner_id, None)
        return code

    def _running(self, runner: _Runner) -> bool:
        return runner.proc.returncode is None

    async def _sigterm(self, runner: _Runner) -> None:
        _killpg(runner.proc.pid, signal.SIGTERM)

    async def _kill(self, runner: _Runner) -> None:
        runner.stopping = True
        _killpg(runner.proc.pid, signal.SIGKILL)
        assert runner.exited is not None
        await asyncio.shield(runner.exited)
        self._runners.pop(runner.spec.runner_id, None)


_Output = asyncio.StreamReader | int  # a spawned runner's pipe, or our end of a forked one's


async def _pump(runner: _Runner, output: _Output, name: str) -> None:
    if isinstance(output, asyncio.StreamReader):
        await _pump_lines(runner, output, name)
        return
    stream, transport = await open_pipe(output)
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
        runner.log(name, raw.decode("utf-8", "replace").rstrip("\r\n"))


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
