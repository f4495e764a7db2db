"""One app's pool in the fleet: its runners, its waiting requests, its options, and which
runner takes the next request.

A ``Pool`` holds the app's runners (tagged with their revision) and a FIFO of ``Waiter``s,
requests waiting for a slot. ``Pool.options`` merges the defaults, the revision's manifest
options and the app's live scale settings. ``Pool.pick`` prefers a free current-revision
runner whose remembered ``X-Fal-Runner-Hints`` contain the caller's hint, else the least
loaded; ``take`` gives one of its slots to a request.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from buildsvc.records import AppRecord, RevisionRecord
from buildsvc.runners import SERVING, Runner
from buildsvc.runtime.base import RunnerState

__all__ = ["Pool", "Waiter", "take"]

_DEFAULTS = {"keep_alive": 10, "min_concurrency": 0, "max_concurrency": 10, "max_multiplexing": 1}
_ENDED = (RunnerState.DRAINING, RunnerState.TERMINATED, RunnerState.FAILED)


@dataclass(eq=False)
class Waiter:
    fut: asyncio.Future[Runner | BaseException]
    request_id: str | None
    since: float = field(default_factory=time.time)


@dataclass(eq=False)
class Pool:
    app: AppRecord
    revision: RevisionRecord | None = None  # the revision that serves traffic
    runners: dict[str, Runner] = field(default_factory=dict)
    waiters: deque[Waiter] = field(default_factory=deque)
    closed: bool = False
    failures: int = 0  # cold starts failed in a row: the keep-warm loop backs off
    retry_at: float = 0.0

    def options(self, revision: RevisionRecord | None = None) -> dict[str, Any]:
        rev = revision or self.revision
        manifest_opts = rev.manifest.get("options", {}) if rev else {}
        merged = {**_DEFAULTS, **manifest_opts, **(self.app.scale or {})}
        return {k: (_DEFAULTS[k] if merged[k] is None and k in _DEFAULTS else v)
                for k, v in merged.items()}  # fmt: skip

    def live(self) -> list[Runner]:
        """Runners that count against max_concurrency: not stopping, not ended."""
        return [r for r in self.runners.values()
                if r.stop_task is None and r.info.state not in _ENDED]  # fmt: skip

    def pick(self, hint: str | None) -> Runner | None:
        """A current-revision runner with a free slot: one that remembers ``hint``, else the
        least loaded; None when there is none."""
        rev = self.revision.id if self.revision else None
        best: Runner | None = None
        for r in self.runners.values():
            info = r.info
            if info.revision != rev or info.state not in SERVING or r.stop_task is not None:
                continue
            if info.in_flight >= r.max_multiplexing:
                continue
            if hint is not None and hint in r.hints:
                return r
            if best is None or info.in_flight < best.info.in_flight:
                best = r
        return best


def take(runner: Runner, request_id: str | None) -> None:
    """Give one of ``runner``'s slots to the request ``request_id``."""
    runner.info.in_flight += 1
    runner.info.state = RunnerState.RUNNING
    runner.request_id = request_id if runner.max_multiplexing == 1 else None
