"""The local process backend: each runner is a process group on this machine.

A runner is ``<env python> -m buildsvc.runtime.agent`` spawned directly (no shell: a shim
costs ~100 ms of cold start), in its own session, with a clean environment (never the
service's own: it may hold secrets) and two pipes: the agent's control channel (JSON lines,
contract 3) and a *lifeline* whose write end only this process holds, so a runner notices
when the service dies and takes its own group down. App code is never unpickled here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
from dataclasses import dataclass, field

from buildsvc.runtime.base import (
    RunnerEvents,
    RunnerHandle,
    RunnerSpec,
    RunnerStartError,
    RunnerState,
)

__all__ = ["LocalBackend"]

# The only variables of the service's environment a runner inherits.
_PASSTHROUGH = ("PATH", "HOME", "LANG", "TMPDIR")
_STDERR_TAIL = 40
_LINE_LIMIT = 1 << 20
_DRAIN_S = 1.0  # how long to wait for log pipes after exit (a child may hold them open)
_EXIT_CODES_KEPT = 1024


@dataclass(eq=False)
class _Runner:
    spec: RunnerSpec
    events: RunnerEvents
    proc: asyncio.subprocess.Process
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

    def __init__(self) -> None:
        self._runners: dict[str, _Runner] = {}
        self._exit_codes: collections.OrderedDict[str, int] = collections.OrderedDict()

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

    async def close(self) -> None:
        """Stop every runner (each with its own grace period)."""
        handles = [RunnerHandle(r.spec.runner_id, "", r.proc.pid)
                   for r in self._runners.values()]
        await asyncio.gather(*(self.stop(h) for h in handles))

    async def _spawn(self, spec: RunnerSpec, events: RunnerEvents) -> _Runner:
        control_r, control_w = os.pipe()
        lifeline_r, lifeline_w = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                str(spec.python), "-m", "buildsvc.runtime.agent",
                cwd=spec.workdir, env=_runner_env(spec, control_w, lifeline_r),
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
        return self._track(spec, events, proc, control_r, lifeline_w)

    def _track(self, spec: RunnerSpec, events: RunnerEvents, proc: asyncio.subprocess.Process,
               control_r: int, lifeline_w: int) -> _Runner:
        loop = asyncio.get_running_loop()
        runner = _Runner(spec, events, proc, lifeline_w, loop.create_future())
        runner.ready.add_done_callback(_consume_exception)
        assert proc.stdout is not None and proc.stderr is not None
        runner.tasks = [
            asyncio.create_task(self._read_control(runner, control_r)),
            asyncio.create_task(_pump(runner, proc.stdout, "stdout")),
            asyncio.create_task(_pump(runner, proc.stderr, "stderr")),
        ]
        runner.exited = asyncio.create_task(self._watch_exit(runner))
        self._runners[spec.runner_id] = runner
        return runner

    async def _read_control(self, runner: _Runner, fd: int) -> None:
        reader = asyncio.StreamReader(limit=_LINE_LIMIT)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
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


async def _pump(runner: _Runner, stream: asyncio.StreamReader, name: str) -> None:
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


def _runner_env(spec: RunnerSpec, control_fd: int, lifeline_fd: int) -> dict[str, str]:
    env = {k: os.environ[k] for k in _PASSTHROUGH if k in os.environ}
    env["PATH"] = os.pathsep.join(filter(None, [str(spec.python.parent), env.get("PATH")]))
    if (spec.python.parent.parent / "pyvenv.cfg").exists():
        env["VIRTUAL_ENV"] = str(spec.python.parent.parent)
    env.update(spec.env)
    # Without an allocation a runner sees no GPU at all, rather than every GPU.
    if spec.gpu_ids or "CUDA_VISIBLE_DEVICES" not in spec.env:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in spec.gpu_ids)
    env.update({
        "FAL_RUNNER_ID": spec.runner_id,
        "FAL_AGENT_CONTROL_FD": str(control_fd),
        "FAL_AGENT_LIFELINE_FD": str(lifeline_fd),
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
