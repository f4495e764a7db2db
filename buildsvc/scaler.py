"""The autoscaling policy: one app's load and scale settings -> how many runners it wants.

A pure function of its inputs (no clock, no I/O), so it is tested on tables of cases and a
smarter policy can replace it. The fleet gathers the load (its runners, the requests waiting
for a slot, the queue's pending rows) and applies the decision: it starts ``start`` runners
and stops the runners named in ``stop``. The rules, in the words of fal's options:

- demand = requests in flight + requests waiting (waiting ones count only once the oldest
  has waited ``scaling_delay`` seconds, or at once when the app has no runner at all:
  nothing could absorb them otherwise);
- needed = ceil(demand / ``max_multiplexing``) runners;
- buffer = the larger of ``concurrency_buffer`` and ``concurrency_buffer_perc`` % of needed
  (rounded up): runners kept warm above the load;
- desired = needed + buffer, at least ``min_concurrency``, at most ``max_concurrency``;
- a runner idle for ``keep_alive`` seconds goes while more than ``desired`` are live (the
  longest idle first); idle runners above ``max_concurrency`` (after a live scale-down) go
  at once. A busy or starting runner is never stopped by the policy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["AppLoad", "RunnerLoad", "ScaleDecision", "ScaleSettings", "decide", "desired_count"]


@dataclass(frozen=True)
class ScaleSettings:
    """The scale options of one app (fal's names and defaults)."""

    min_concurrency: int = 0
    max_concurrency: int = 10
    concurrency_buffer: int = 0
    concurrency_buffer_perc: int = 0
    max_multiplexing: int = 1
    scaling_delay: float = 0.0
    keep_alive: float = 10.0

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ScaleSettings:
        """From an app's resolved options; a missing or None value takes the default."""
        defaults = cls()

        def pick(name: str) -> Any:
            value = options.get(name)
            return getattr(defaults, name) if value is None else value

        return cls(
            min_concurrency=max(0, int(pick("min_concurrency"))),
            max_concurrency=max(1, int(pick("max_concurrency"))),  # 0 would hang every request
            concurrency_buffer=max(0, int(pick("concurrency_buffer"))),
            concurrency_buffer_perc=max(0, int(pick("concurrency_buffer_perc"))),
            max_multiplexing=max(1, int(pick("max_multiplexing"))),
            scaling_delay=max(0.0, float(pick("scaling_delay"))),
            keep_alive=max(0.0, float(pick("keep_alive"))),
        )


@dataclass(frozen=True)
class RunnerLoad:
    """One live runner as the policy sees it."""

    id: str
    in_flight: int
    last_used: float  # when its last request ended (or it became ready)
    starting: bool  # still PENDING or in SETUP


@dataclass(frozen=True)
class AppLoad:
    runners: Sequence[RunnerLoad]
    waiting: int = 0  # requests waiting for a slot: the fleet's line plus the queue's rows
    waiting_since: float | None = None  # when the oldest of them started waiting


@dataclass(frozen=True)
class ScaleDecision:
    desired: int
    start: int
    stop: tuple[str, ...]


def desired_count(settings: ScaleSettings, demand: int) -> int:
    """Runners wanted for ``demand`` concurrent requests (in flight + counted waiting)."""
    needed = math.ceil(max(0, demand) / settings.max_multiplexing)
    perc = math.ceil(needed * settings.concurrency_buffer_perc / 100)
    buffer = max(settings.concurrency_buffer, perc)
    return min(settings.max_concurrency, max(settings.min_concurrency, needed + buffer))


def decide(settings: ScaleSettings, load: AppLoad, now: float) -> ScaleDecision:
    """How many runners to start and which idle ones to stop; see the module docstring."""
    in_flight = sum(r.in_flight for r in load.runners)
    desired = desired_count(settings, in_flight + _counted_waiting(settings, load, now))
    start = max(0, desired - len(load.runners))
    return ScaleDecision(desired, start, _to_stop(settings, load.runners, desired, now))


def _counted_waiting(settings: ScaleSettings, load: AppLoad, now: float) -> int:
    if load.waiting <= 0 or not load.runners or settings.scaling_delay <= 0:
        return max(0, load.waiting)
    since = now if load.waiting_since is None else load.waiting_since
    return load.waiting if now - since >= settings.scaling_delay else 0


def _to_stop(
    settings: ScaleSettings, runners: Sequence[RunnerLoad], desired: int, now: float
) -> tuple[str, ...]:
    idle = sorted((r for r in runners if not r.starting and r.in_flight == 0),
                  key=lambda r: r.last_used)  # fmt: skip
    over_cap = max(0, len(runners) - settings.max_concurrency)
    now_gone = [r.id for r in idle[:over_cap]]
    expired = [r.id for r in idle[over_cap:] if now - r.last_used >= settings.keep_alive]
    room = max(0, len(runners) - len(now_gone) - desired)
    return tuple(now_gone + expired[:room])
