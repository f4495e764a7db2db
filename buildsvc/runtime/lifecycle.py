"""Runner lifecycle bookkeeping shared by the process and container backends.

Both backends run the same agent (contract 3), so they read the same control channel (JSON
lines: ``{"state": ..., "port"?, "error"?}``), track the same states, wait for IDLE under the
same ``startup_timeout``, report the same exit states and stop the same way: SIGTERM, wait up
to the grace period, then SIGKILL, idempotently. That logic lives here once:
:class:`TrackedRunner` is one runner's state, :class:`RunnerBook` the backend half that
starts/stops/waits on it. A backend says only how its runners are launched and signalled.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from buildsvc.runtime.base import (
    RunnerEvents,
    RunnerHandle,
    RunnerSpec,
    RunnerStartError,
    RunnerState,
)

__all__ = ["LINE_LIMIT", "RunnerBook", "TrackedRunner", "consume_exception", "open_pipe",
           "read_control"]

LINE_LIMIT = 1 << 20  # longest control or log line read from a runner
_STDERR_TAIL = 40


@dataclass(eq=False)
class TrackedRunner:
    """One runner as a backend sees it: what it is, where it stands, how it ends."""

    spec: RunnerSpec
    events: RunnerEvents
    ready: asyncio.Future[int]  # the agent's port once IDLE; RunnerStartError before that
    state: RunnerState = RunnerState.PENDING
    stopping: bool = False
    stderr_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=_STDERR_TAIL))
    exited: asyncio.Future[int] | None = None
    stop_task: asyncio.Task[None] | None = None

    def tail(self) -> str:
        return "\n".join(self.stderr_tail)

    def log(self, stream: str, line: str) -> None:
        """Forward one output line to the events (and keep a stderr tail for errors)."""
        if stream == "stderr":
            self.stderr_tail.append(line)
        self.events.on_log(self.spec.runner_id, stream, line)

    def on_control(self, raw: bytes) -> None:
        """One control message from the agent: a state change, IDLE's port, or a failure."""
        try:
            message = json.loads(raw)
            state = RunnerState(message["state"])
        except (ValueError, KeyError, TypeError):
            self.stderr_tail.append(f"[agent] bad control message: {raw[:200]!r}")
            return
        self.state = state
        detail = str(message.get("error", ""))
        self.events.on_state(self.spec.runner_id, state, detail)
        if self.ready.done():
            return
        if state is RunnerState.IDLE:
            self.ready.set_result(int(message["port"]))
        elif state is RunnerState.FAILED:
            self.ready.set_exception(RunnerStartError(
                self.spec.runner_id, "the app failed during startup (see its traceback)",
                detail or self.tail()))

    def on_exit(self, code: int, noun: str) -> None:
        """The runner's process is gone: fail a pending start, or report its final state."""
        rid = self.spec.runner_id
        if not self.ready.done():
            self.ready.set_exception(RunnerStartError(
                rid, f"the {noun} exited with code {code} before it was ready", self.tail()))
        elif self.state not in (RunnerState.TERMINATED, RunnerState.FAILED):
            state = RunnerState.TERMINATED if self.stopping else RunnerState.FAILED
            detail = f"exited with code {code}" + (f"; last stderr:\n{self.tail()}"
                                                   if state is RunnerState.FAILED else "")
            self.state = state
            self.events.on_state(rid, state, detail)


_R = TypeVar("_R", bound=TrackedRunner)


class RunnerBook(Generic[_R]):
    """The backend half shared by both backends: the runner table and its exit codes, the
    wait for IDLE, stop-with-grace and wait. Subclasses provide ``_running``, ``_sigterm``
    and ``_kill`` (SIGKILL, then wait for the exit watcher)."""

    _noun = "runner"  # how messages name a runner of this backend

    def __init__(self, exit_codes_kept: int | None = None) -> None:
        self._runners: dict[str, _R] = {}
        self._exit_codes: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._exit_codes_kept = exit_codes_kept  # None: keep every exit code

    async def stop(self, handle: RunnerHandle, grace_period: float | None = None) -> None:
        """SIGTERM, wait up to the grace period (the spec's by default), then SIGKILL.
        Idempotent: a second call waits for the first."""
        runner = self._runners.get(handle.runner_id)
        if runner is None:
            return
        grace = runner.spec.grace_period if grace_period is None else grace_period
        if runner.stop_task is None:
            runner.stop_task = asyncio.create_task(self._terminate(runner, grace))
        await asyncio.shield(runner.stop_task)

    async def wait(self, handle: RunnerHandle) -> int:
        """Wait for the runner to exit; its exit code."""
        runner = self._runners.get(handle.runner_id)
        if runner is not None and runner.exited is not None:
            return await asyncio.shield(runner.exited)
        if handle.runner_id in self._exit_codes:
            return self._exit_codes[handle.runner_id]
        raise KeyError(f"runner {handle.runner_id!r} was not started by this backend")

    async def _until_ready(self, runner: _R) -> int:
        """The agent's port once IDLE; kill the runner and raise if it does not get there."""
        spec = runner.spec
        try:
            return await asyncio.wait_for(asyncio.shield(runner.ready), spec.startup_timeout)
        except TimeoutError:
            await self._kill(runner)
            raise RunnerStartError(
                spec.runner_id, f"not ready within startup_timeout = {spec.startup_timeout:g} "
                "seconds; make setup() faster or raise startup_timeout", runner.tail()) from None
        except BaseException:
            await self._kill(runner)
            raise

    def _record_exit(self, runner: _R, code: int) -> None:
        runner.on_exit(code, self._noun)
        self._exit_codes[runner.spec.runner_id] = code
        kept = self._exit_codes_kept
        while kept is not None and len(self._exit_codes) > kept:
            self._exit_codes.popitem(last=False)

    async def _terminate(self, runner: _R, grace: float) -> None:
        runner.stopping = True
        assert runner.exited is not None
        if self._running(runner):
            await self._sigterm(runner)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(runner.exited), grace)
        await self._kill(runner)

    def _running(self, runner: _R) -> bool:
        raise NotImplementedError

    async def _sigterm(self, runner: _R) -> None:
        raise NotImplementedError

    async def _kill(self, runner: _R) -> None:
        raise NotImplementedError


async def open_pipe(fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    """A stream reader over the read end ``fd`` of a pipe or FIFO (which it then owns)."""
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
    return reader, transport


async def read_control(runner: TrackedRunner, fd: int) -> None:
    """Feed every control line arriving on ``fd`` to the runner, until EOF."""
    reader, transport = await open_pipe(fd)
    try:
        async for raw in reader:
            runner.on_control(raw)
    finally:
        transport.close()


def consume_exception(future: asyncio.Future[Any]) -> None:
    # Whoever awaits re-raises it; this only keeps asyncio from warning when nobody did.
    if not future.cancelled():
        future.exception()
