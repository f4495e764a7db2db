"""The runtime backend seam: what the service needs from anything that runs runners.

The local process backend (``runtime.local``) implements it today; a Docker backend and a
Ray backend plug in behind the same protocol later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

__all__ = [
    "RunnerEvents",
    "RunnerHandle",
    "RunnerSpec",
    "RunnerStartError",
    "RunnerState",
    "RuntimeBackend",
]


class RunnerState(StrEnum):
    PENDING = "PENDING"
    SETUP = "SETUP"
    IDLE = "IDLE"
    RUNNING = "RUNNING"
    DRAINING = "DRAINING"
    TERMINATED = "TERMINATED"
    FAILED = "FAILED"


@dataclass
class RunnerSpec:
    runner_id: str
    app_name: str
    revision_id: str
    python: Path
    workdir: Path
    payload: Path
    kind: str = "app"
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout: float = 600.0
    grace_period: float = 5.0
    max_multiplexing: int = 1
    gpu_ids: list[int] = field(default_factory=list)


@dataclass
class RunnerHandle:
    runner_id: str
    url: str
    pid: int


class RunnerStartError(Exception):
    """A runner failed before it became IDLE; ``detail`` holds the app's traceback."""

    def __init__(self, runner_id: str, reason: str, detail: str = "") -> None:
        super().__init__(f"runner {runner_id} failed to start: {reason}")
        self.runner_id = runner_id
        self.reason = reason
        self.detail = detail


class RunnerEvents(Protocol):
    def on_state(self, runner_id: str, state: RunnerState, detail: str = "") -> None: ...

    def on_log(self, runner_id: str, stream: str, line: str) -> None: ...


class RuntimeBackend(Protocol):
    async def start(self, spec: RunnerSpec, events: RunnerEvents) -> RunnerHandle:
        """Spawn a runner and return once it is IDLE; raise RunnerStartError otherwise."""
        ...

    async def stop(self, handle: RunnerHandle, grace_period: float) -> None:
        """SIGTERM, wait up to ``grace_period`` for a clean exit, then kill the group."""
        ...

    async def wait(self, handle: RunnerHandle) -> int:
        """Wait for the runner to exit; return its exit code."""
        ...
