"""Health checks of runners: regular probes, the failure threshold, and one-off probes.

With ``health_check.call_regularly`` the fleet has ``HealthChecker.watch`` GET every runner's
health path each ``interval`` seconds; a non-2xx answer or a timeout is a failure, counted
once the runner is ``start_period_seconds`` old, and ``failure_threshold`` failures in a row
make the fleet replace it. ``HealthChecker.ok`` is one probe; the fleet uses it on its own
when the gateway or the queue saw a runner answer 500 or 502 (``Fleet.probe``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from buildsvc.runners import SERVING, Runner

__all__ = ["HEALTH_INTERVAL", "PROBE_DEFAULT", "FailureStreak", "HealthChecker"]

HEALTH_INTERVAL = 10.0  # seconds between regular health probes (config: fleet.health_interval)
PROBE_DEFAULT = {"path": "/health", "timeout_seconds": 5}  # a one-off probe without a config


@dataclass
class FailureStreak:
    """Failed probes in a row; those within the start period do not count."""

    threshold: int
    start_period: float
    failures: int = 0

    @classmethod
    def from_check(cls, check: dict[str, Any]) -> FailureStreak:
        return cls(threshold=max(1, int(check.get("failure_threshold") or 3)),
                   start_period=float(check.get("start_period_seconds") or 0))  # fmt: skip

    def exceeded(self, healthy: bool, age: float) -> bool:
        """Count one probe of a runner ``age`` seconds old; True once it must be replaced."""
        if healthy:
            self.failures = 0
        elif age >= self.start_period:
            self.failures += 1
            return self.failures >= self.threshold
        return False


class HealthChecker:
    """Probes runners over one shared HTTP session."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._session: aiohttp.ClientSession | None = None

    async def watch(
        self,
        runner: Runner,
        check: dict[str, Any],
        *,
        tracked: Callable[[], bool],
        replace: Callable[[str], None],
    ) -> None:
        """Probe ``runner`` while it serves and the fleet ``tracked()`` it; ``replace(why)``
        once it failed ``failure_threshold`` probes in a row."""
        streak = FailureStreak.from_check(check)
        while runner.stop_task is None and tracked():
            await asyncio.sleep(self.interval)
            if runner.stop_task is not None or runner.info.state not in SERVING:
                return
            healthy = await self.ok(runner, check)
            if streak.exceeded(healthy, time.time() - runner.info.started_at):
                replace(f"failed {streak.failures} health checks in a row")
                return

    async def ok(self, runner: Runner, check: dict[str, Any]) -> bool:
        """GET the health path: a 2xx within ``timeout_seconds`` is healthy."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        timeout = aiohttp.ClientTimeout(total=float(check.get("timeout_seconds") or 5))
        try:
            url = f"{runner.info.url}{check.get('path') or '/health'}"
            async with self._session.get(url, timeout=timeout, allow_redirects=False) as resp:
                return 200 <= resp.status < 300
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
