"""One runner as the fleet sees it: its record, its state changes, its logs and its history.

``RunnerInfo`` is what callers see (the API lists it, a ``Lease`` carries it); ``Runner``
adds the fleet's private bookkeeping (slots, hints, the tasks that boot, watch, probe and
stop it). ``RunnerLedger`` is the one place a state change is logged and written to the
store's runner history, and it tags each line a runner prints with the request it serves.
``runner_spec`` turns a revision and its options into what a runtime backend starts.

Runner states: PENDING -> SETUP -> IDLE <-> RUNNING -> DRAINING -> TERMINATED, or FAILED.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from buildsvc.logs import LogHub, LogRecord
from buildsvc.records import RevisionRecord, RunnerRecord
from buildsvc.runtime.base import (
    RunnerHandle,
    RunnerSpec,
    RunnerStartError,
    RunnerState,
)

__all__ = ["SERVING", "STARTING", "Runner", "RunnerInfo", "RunnerLedger", "runner_spec"]

SERVING = (RunnerState.IDLE, RunnerState.RUNNING)
STARTING = (RunnerState.PENDING, RunnerState.SETUP)


@dataclass
class RunnerInfo:
    id: str
    owner: str
    app: str
    revision: str
    state: RunnerState
    pid: int | None
    url: str | None
    started_at: float
    in_flight: int = 0
    last_used: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = str(self.state)
        return data


@dataclass(eq=False)
class Runner:
    info: RunnerInfo
    max_multiplexing: int
    grace: float
    ready: asyncio.Future[RunnerStartError | None]
    handle: RunnerHandle | None = None
    hints: frozenset[str] = frozenset()
    request_id: str | None = None  # the last request taken, when max_multiplexing is 1
    boot: asyncio.Task[None] | None = None
    stop_task: asyncio.Task[None] | None = None
    watch: asyncio.Task[None] | None = None
    health: asyncio.Task[None] | None = None  # the regular probes, or a one-off probe
    backend: Any = None  # what runs it: ``backend_for(revision)`` (processes or containers)


def runner_spec(
    runner: Runner, revision: RevisionRecord, opts: dict[str, Any], gpus: Any
) -> RunnerSpec:
    """What the backend needs to start ``runner``; allocates its GPUs from ``gpus``."""
    rid = runner.info.id
    gpu_ids: list[int] = []
    wanted = int(opts.get("num_gpus") or 0)
    if wanted > 0 and gpus is not None:
        try:
            gpu_ids = list(gpus.allocate(rid, wanted))
        except Exception as exc:  # the allocator's own error type is its business
            raise RunnerStartError(rid, f"cannot allocate {wanted} GPU(s): {exc}") from exc
    return RunnerSpec(
        runner_id=rid,
        app_name=revision.app,
        revision_id=revision.id,
        python=Path(revision.python),
        workdir=Path(revision.workdir),
        payload=Path(revision.payload),
        kind=str(revision.manifest.get("kind", "app")),
        startup_timeout=float(opts.get("startup_timeout") or 600),
        grace_period=runner.grace,
        max_multiplexing=runner.max_multiplexing,
        gpu_ids=gpu_ids,
    )


class RunnerLedger:
    """Logs and history of runners: service lines, runner output, state changes."""

    def __init__(self, store: Any, logs: LogHub) -> None:
        self._store, self._logs = store, logs

    def set_state(self, runner: Runner, state: RunnerState, detail: str = "") -> None:
        info = runner.info
        if info.state == state:
            return
        quiet = state in SERVING and info.state in SERVING  # per-request flips stay silent
        info.state = state
        if not quiet:
            message = f"runner {info.id} {state}" + (f": {detail}" if detail else "")
            level = "ERROR" if state == RunnerState.FAILED else "INFO"
            self.log(info, level, message)
            self.record(info)

    def log(self, info: RunnerInfo, level: str, message: str) -> None:
        """A line the service writes about a runner."""
        self._logs.emit(LogRecord(
            timestamp=time.time(), level=level, source="service", owner=info.owner,
            app=info.app, runner_id=info.id, request_id=None, message=message,
        ))  # fmt: skip

    def runner_line(self, runner: Runner, stream: str, line: str) -> None:
        """A line the runner printed, tagged with the request it serves if that is clear."""
        info = runner.info
        self._logs.emit(LogRecord(
            timestamp=time.time(), level=stream.upper(), source="runner", owner=info.owner,
            app=info.app, runner_id=info.id, request_id=_request_id(runner),
            message=line.rstrip("\n"),
        ))  # fmt: skip

    def record(self, info: RunnerInfo, ended: bool = False) -> None:
        record = RunnerRecord(
            id=info.id, owner=info.owner, app=info.app, revision=info.revision,
            state=str(info.state), pid=info.pid, url=info.url, started_at=info.started_at,
            ended_at=time.time() if ended else None,
        )  # fmt: skip
        try:
            self._store.record_runner(record)
        except Exception:  # history is best effort; a closed store at shutdown is not fatal
            pass


def _request_id(runner: Runner) -> str | None:
    # Output reaches us through a pipe, often just after the response went out over TCP,
    # so a line that arrives shortly after the last request still belongs to it.
    info = runner.info
    if info.in_flight == 1 or (info.in_flight == 0 and time.time() - info.last_used < 1.0):
        return runner.request_id
    return None
