"""The fleet: the runners of every app, who serves the next request, and when runners stop.

One ``Pool`` per app (``buildsvc.pool``) holds its runners (tagged with their revision) and a
FIFO of requests waiting for a slot. ``acquire`` takes a free slot of a current-revision runner
(preferring one whose remembered ``X-Fal-Runner-Hints`` contain the caller's hint, else the
least loaded); if there is none the request queues and, while waiting requests outnumber the
slots of runners already starting and the app is under ``max_concurrency``, a cold start
begins. A released slot is handed straight to the oldest waiter, so waiters are served in order
and a request arriving later cannot overtake them.

A background loop applies the pure policy of ``buildsvc.scaler`` (runners, waiting requests,
the queue's backlog and the app's live scale settings -> runners to start and to stop), and
so does every new waiter, so a cold start begins at once unless ``scaling_delay`` says wait.
Runner states: PENDING -> SETUP -> IDLE <-> RUNNING -> DRAINING -> TERMINATED, or FAILED. A
runner that reports DRAINING by itself (it got a SIGTERM) takes no new request. A runner's
record, state changes, logs and history are ``buildsvc.runners``; its health checks are
``buildsvc.health`` (the fleet replaces a runner that fails them; ``probe`` checks one once,
the gateway and the queue call it after a 500 or 502).

Everything runs on the service's event loop; state changes happen between awaits, so no lock
is needed.

    FleetError
    ├── NoRunnerAvailable (also TimeoutError)  no slot within the caller's timeout
    └── AppStopped                              the app was stopped while the request waited
    RunnerStartError (runtime.base)             a cold start failed; carries the traceback
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from buildsvc import scaler
from buildsvc.health import HEALTH_INTERVAL as _HEALTH_INTERVAL
from buildsvc.health import PROBE_DEFAULT, HealthChecker
from buildsvc.logs import LogHub
from buildsvc.pool import Pool, Waiter, take
from buildsvc.records import AppRecord, RevisionRecord
from buildsvc.runners import SERVING as _SERVING
from buildsvc.runners import STARTING as _STARTING
from buildsvc.runners import Runner as _Runner
from buildsvc.runners import RunnerInfo, RunnerLedger, runner_spec
from buildsvc.runtime.base import (
    RunnerHandle,
    RunnerStartError,
    RunnerState,
    RuntimeBackend,
)
from buildsvc.scaler import AppLoad, RunnerLoad, ScaleDecision, ScaleSettings

__all__ = [
    "AppStopped",
    "Fleet",
    "FleetError",
    "Lease",
    "NoRunnerAvailable",
    "RunnerInfo",
    "RunnerLoad",
    "ScaleDecision",
    "ScalePolicy",
    "desired_runners",
]

_MAX_BACKOFF = 60.0  # seconds between keep-warm retries of an app that fails to start


class FleetError(Exception):
    """Base of the errors ``Fleet.acquire`` raises on purpose."""


class NoRunnerAvailable(FleetError, TimeoutError):
    pass


class AppStopped(FleetError):
    pass


# -- the first scaling API, kept for its callers; the policy is buildsvc.scaler -----------


@dataclass(frozen=True)
class ScalePolicy:
    min_concurrency: int
    max_concurrency: int
    keep_alive: float


def desired_runners(
    policy: ScalePolicy, runners: Sequence[RunnerLoad], now: float
) -> ScaleDecision:
    """Which idle runners to stop and how many to start, for one app's live runners."""
    settings = ScaleSettings(min_concurrency=policy.min_concurrency,
                             max_concurrency=policy.max_concurrency,
                             keep_alive=policy.keep_alive)  # fmt: skip
    return scaler.decide(settings, AppLoad(runners), now)


class Lease:
    """One slot on one runner; ``release`` gives it back (``broken=True`` replaces it)."""

    __slots__ = ("_fleet", "_pool", "_runner", "_released", "runner")

    def __init__(self, fleet: Fleet, pool: Pool, runner: _Runner) -> None:
        self._fleet, self._pool, self._runner = fleet, pool, runner
        self.runner = runner.info
        self._released = False

    async def release(self, *, broken: bool = False) -> None:
        if not self._released:
            self._released = True
            self._fleet._release(self._pool, self._runner, broken)


class Fleet:
    """Runners per app; see the module docstring."""

    def __init__(
        self,
        *,
        store: Any,
        backend: RuntimeBackend,
        gpus: Any,
        logs: LogHub,
        config: Any,
        backend_for: Callable[[RevisionRecord], RuntimeBackend] | None = None,
    ) -> None:
        self._store, self._backend, self._gpus, self._logs = store, backend, gpus, logs
        # Per revision: one with an image runs as containers, the others as processes.
        self._backend_for = backend_for or (lambda _revision: backend)
        extra = getattr(config, "extra", None) or {}
        self._interval = float(extra.get("fleet.reap_interval", 1.0))
        self._health = HealthChecker(float(extra.get("fleet.health_interval", _HEALTH_INTERVAL)))
        self._book = RunnerLedger(store, logs)
        self._pools: dict[tuple[str, str], Pool] = {}
        self._by_id: dict[str, _Runner] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._backlog: Callable[[str, str], int] | None = None  # the queue's pending rows
        self._on_scale: Callable[[str, str], None] | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the keep-alive loop; apps with min_concurrency > 0 are warmed by it."""
        for app in self._store.list_apps():
            if app.current_revision:
                rev = self._store.get_revision(app.current_revision)
                if rev is not None:
                    self._pool(app).revision = rev
        self._loop_task = asyncio.create_task(self._scale_loop())

    async def close(self) -> None:
        """Stop every runner (SIGTERM, then kill after its grace period)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            self._close_pool(pool)
        stops = [self._request_stop(r) for p in pools for r in list(p.runners.values())]
        await asyncio.gather(*stops, return_exceptions=True)
        await self._health.close()
        self._logs.flush()

    # -- public API ---------------------------------------------------------------------

    async def ensure_runner(self, app: AppRecord, revision: RevisionRecord) -> RunnerInfo:
        """At least one IDLE runner of ``revision``; raises RunnerStartError with the app's
        traceback when its setup fails (``fal run`` shows it at once)."""
        pool = self._pool(app)
        if pool.revision is None:
            pool.revision = revision
        for r in pool.live():
            if r.info.revision == revision.id and r.info.state in (*_SERVING, *_STARTING):
                break
        else:
            r = self._spawn(pool, revision)
        error = await asyncio.shield(r.ready)
        if error is not None:
            raise error
        return r.info

    async def acquire(
        self,
        app: AppRecord,
        revision: RevisionRecord,
        *,
        hint: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> Lease:
        """A slot on a runner of ``revision``, cold-starting one if needed.

        Raises NoRunnerAvailable after ``timeout`` seconds, RunnerStartError when the cold
        start this request waits on fails, AppStopped when the app is stopped meanwhile."""
        pool = self._pool(app)
        if pool.revision is None or pool.revision.id != revision.id:
            self._switch(pool, revision, "rolling")
        if not pool.waiters:
            runner = pool.pick(hint)
            if runner is not None:
                take(runner, request_id)
                return Lease(self, pool, runner)
        return await self._wait(pool, timeout, request_id)

    def remember_hints(self, runner_id: str, header: str) -> None:
        """Record the ``X-Fal-Runner-Hints`` a runner answered with."""
        runner = self._by_id.get(runner_id)
        if runner is not None:
            runner.hints = frozenset(h.strip() for h in header.split(",") if h.strip())

    async def stop_app(self, owner: str, name: str) -> None:
        """Stop every runner of an app; requests still waiting get AppStopped."""
        pool = self._pools.pop((owner, name), None)
        if pool is None:
            return
        self._close_pool(pool)
        stops = [self._request_stop(r) for r in list(pool.runners.values())]
        await asyncio.gather(*stops, return_exceptions=True)

    async def revision_changed(self, app: AppRecord, strategy: str) -> None:
        """Route new requests to ``app.current_revision``'s runners and retire the others:
        "rolling" lets old runners finish their requests, "recreate" stops them now."""
        pool = self._pool(app)
        pool.app = app
        rev = self._store.get_revision(app.current_revision) if app.current_revision else None
        if rev is None:
            return
        old = self._switch(pool, rev, strategy)
        if strategy == "recreate":
            await asyncio.gather(*(self._request_stop(r) for r in old), return_exceptions=True)

    def attach_backlog(
        self, count: Callable[[str, str], int], on_scale: Callable[[str, str], None]
    ) -> None:
        """Let the queue take part: ``count(owner, app)`` is its number of pending rows (the
        scaler's queue depth), ``on_scale(owner, app)`` is told when an app's scale changed."""
        self._backlog, self._on_scale = count, on_scale

    def update_scale(self, app: AppRecord) -> None:
        """Apply ``app.scale`` (just stored) now: start or stop runners as the policy says.
        Runners already up keep the max_multiplexing they started with."""
        pool = self._pool(app)
        self._apply(pool, time.time())
        if self._on_scale is not None:
            self._on_scale(app.owner, app.name)

    def probe(self, runner_id: str) -> None:
        """Check one runner's health path once, in the background; replace it if it fails.
        The gateway and the queue call this when a runner answered 500 or 502."""
        runner = self._by_id.get(runner_id)
        if runner is None or runner.stop_task is not None or runner.handle is None:
            return
        if runner.health is None or runner.health.done():  # regular probes cover it otherwise
            pool = self._pools.get((runner.info.owner, runner.info.app))
            runner.health = asyncio.create_task(self._probe_once(pool, runner))

    def list_runners(self, owner: str | None = None, app: str | None = None) -> list[RunnerInfo]:
        return [
            dataclasses.replace(r.info)
            for (o, a), pool in list(self._pools.items())
            if owner in (None, o) and app in (None, a)
            for r in list(pool.runners.values())
        ]

    # -- picking and waiting ------------------------------------------------------------

    def _pool(self, app: AppRecord) -> Pool:
        pool = self._pools.get((app.owner, app.name))
        if pool is None:
            pool = self._pools[(app.owner, app.name)] = Pool(app)
        elif pool.app is not app:
            pool.app = app  # the store hands out a new record after every write
        return pool

    async def _wait(self, pool: Pool, timeout: float | None, request_id: str | None) -> Lease:
        waiter = Waiter(asyncio.get_running_loop().create_future(), request_id)
        pool.waiters.append(waiter)
        self._scale_up(pool)
        try:
            async with asyncio.timeout(timeout):
                got = await waiter.fut
        except TimeoutError:
            self._abandon(pool, waiter)
            raise NoRunnerAvailable(
                f"no runner of {pool.app.owner}/{pool.app.name} became free within "
                f"{timeout:g}s: raise X-Fal-Request-Timeout or max_concurrency"
            ) from None
        except asyncio.CancelledError:
            self._abandon(pool, waiter)
            raise
        if isinstance(got, BaseException):
            raise got
        return Lease(self, pool, got)

    def _abandon(self, pool: Pool, waiter: Waiter) -> None:
        with contextlib.suppress(ValueError):
            pool.waiters.remove(waiter)
        fut = waiter.fut
        got = fut.result() if fut.done() and not fut.cancelled() else None
        if isinstance(got, _Runner):
            self._release(pool, got, broken=False)  # a slot handed over too late

    def _hand_off(self, pool: Pool, runner: _Runner) -> None:
        """Give the runner's free slots to the oldest waiters."""
        while pool.waiters and runner.info.in_flight < runner.max_multiplexing:
            waiter = pool.waiters.popleft()
            if not waiter.fut.done():
                take(runner, waiter.request_id)
                waiter.fut.set_result(runner)

    def _release(self, pool: Pool, runner: _Runner, broken: bool) -> None:
        info = runner.info
        info.in_flight = max(0, info.in_flight - 1)
        info.last_used = time.time()
        if broken or runner.stop_task is not None or info.state not in _SERVING:
            if broken or info.in_flight == 0:
                self._request_stop(runner)
            self._scale_up(pool)
            return
        if pool.revision is not None and info.revision == pool.revision.id:
            self._hand_off(pool, runner)
        if info.in_flight == 0:
            info.state = RunnerState.IDLE

    def _scale_up(self, pool: Pool) -> None:
        """Cold-start what the policy wants for the waiting requests, now: the keep-alive
        loop would only see them a tick later (it also adds the queue's backlog)."""
        if pool.closed or pool.revision is None or not pool.waiters:
            return
        settings = ScaleSettings.from_options(pool.options())
        decision = scaler.decide(settings, self._load(pool, backlog=False), time.time())
        for _ in range(decision.start):
            self._spawn(pool, pool.revision)

    def _load(self, pool: Pool, *, backlog: bool) -> AppLoad:
        runners = [RunnerLoad(r.info.id, r.info.in_flight, r.info.last_used,
                              r.info.state in _STARTING) for r in pool.live()]  # fmt: skip
        waiting = len(pool.waiters)
        if backlog and self._backlog is not None:
            try:
                waiting += self._backlog(pool.app.owner, pool.app.name)
            except Exception:  # a closing queue database must not stop the loop
                pass
        return AppLoad(runners, waiting, pool.waiters[0].since if pool.waiters else None)

    def _switch(self, pool: Pool, revision: RevisionRecord, strategy: str) -> list[_Runner]:
        """Make ``revision`` the serving one; drain the runners of other revisions."""
        pool.revision = revision
        old = [r for r in pool.runners.values() if r.info.revision != revision.id]
        adopted = [r for r in old if r.stop_task is None and self._runs_same_code(r, revision)]
        for r in adopted:  # an unchanged redeploy: warm runners stay warm
            r.info.revision = revision.id
        old = [r for r in old if r not in adopted]
        for r in old:
            if r.stop_task is None and (strategy == "recreate" or r.info.in_flight == 0):
                self._request_stop(r)
            elif r.info.state in (*_SERVING, *_STARTING):
                self._book.set_state(r, RunnerState.DRAINING, "a new revision serves traffic")
        self._scale_up(pool)
        return old

    def _runs_same_code(self, runner: _Runner, revision: RevisionRecord) -> bool:
        """Whether ``runner`` already runs exactly what ``revision`` would start: the same
        bundle (code and options), environment or image, files and payload."""
        current = self._store.get_revision(runner.info.revision)
        return current is not None and _runtime_of(current) == _runtime_of(revision)

    def _close_pool(self, pool: Pool) -> None:
        pool.closed = True
        error = AppStopped(f"app {pool.app.owner}/{pool.app.name} was stopped")
        while pool.waiters:
            waiter = pool.waiters.popleft()
            if not waiter.fut.done():
                waiter.fut.set_result(error)

    # -- starting and stopping runners --------------------------------------------------

    def _spawn(self, pool: Pool, revision: RevisionRecord) -> _Runner:
        opts = pool.options(revision)
        app = pool.app
        now = time.time()
        info = RunnerInfo(
            id=f"r-{secrets.token_hex(6)}", owner=app.owner, app=app.name,
            revision=revision.id, state=RunnerState.PENDING, pid=None, url=None,
            started_at=now, last_used=now,
        )  # fmt: skip
        runner = _Runner(
            info=info,
            max_multiplexing=max(1, int(opts["max_multiplexing"])),
            grace=float(opts.get("termination_grace_period_seconds") or 0),
            ready=asyncio.get_running_loop().create_future(),
        )
        pool.runners[info.id] = self._by_id[info.id] = runner
        self._book.log(info, "INFO", f"runner {info.id} starting (revision {revision.id})")
        self._book.record(info)
        runner.boot = asyncio.create_task(self._boot(pool, runner, revision, opts))
        return runner

    async def _boot(
        self, pool: Pool, runner: _Runner, revision: RevisionRecord, opts: dict[str, Any]
    ) -> None:
        try:
            spec = runner_spec(runner, revision, opts, self._gpus)
            runner.backend = self._backend_for(revision)
            handle = await runner.backend.start(spec, self)
        except asyncio.CancelledError:
            self._finish(pool, runner, RunnerState.TERMINATED, "stopped while starting")
            raise
        except RunnerStartError as exc:
            self._boot_failed(pool, runner, exc)
            return
        except Exception as exc:  # a backend bug must not leave waiters hanging
            reason = f"the runtime backend raised {type(exc).__name__}" + (
                f": {exc}" if str(exc) else ""
            )
            detail = traceback.format_exc()
            self._boot_failed(pool, runner, RunnerStartError(runner.info.id, reason, detail))
            return
        runner.handle = handle
        runner.info.url, runner.info.pid = handle.url, handle.pid
        self._book.set_state(runner, RunnerState.IDLE)
        runner.info.last_used = time.time()
        runner.ready.set_result(None)
        pool.failures = 0
        runner.watch = asyncio.create_task(self._watch(pool, runner, handle))
        check = opts.get("health_check")
        if isinstance(check, dict) and check.get("call_regularly"):
            runner.health = asyncio.create_task(self._health.watch(
                runner, check, tracked=lambda: runner.info.id in self._by_id,
                replace=lambda why: self._replace(pool, runner, why)))  # fmt: skip
        if runner.stop_task is None and pool.revision and revision.id == pool.revision.id:
            self._hand_off(pool, runner)
            if runner.info.in_flight:
                runner.info.state = RunnerState.RUNNING

    def _boot_failed(self, pool: Pool, runner: _Runner, exc: RunnerStartError) -> None:
        tail = exc.detail[-4000:] if exc.detail else ""
        self._book.log(runner.info, "ERROR", f"runner {runner.info.id} failed to start: "
                  f"{exc.reason}" + (f"\n{tail}" if tail else ""))  # fmt: skip
        runner.ready.set_result(exc)
        self._finish(pool, runner, RunnerState.FAILED, exc.reason)
        pool.failures += 1
        pool.retry_at = time.time() + min(_MAX_BACKOFF, 2.0**pool.failures)
        rev = pool.revision.id if pool.revision else None
        others = [r for r in pool.live() if r.info.revision == rev]
        if runner.info.revision == rev and not others:
            while pool.waiters:  # nothing else could ever serve them: tell them why
                waiter = pool.waiters.popleft()
                if not waiter.fut.done():
                    waiter.fut.set_result(exc)

    async def _watch(self, pool: Pool, runner: _Runner, handle: RunnerHandle) -> None:
        code = await (runner.backend or self._backend).wait(handle)
        if runner.stop_task is None and runner.info.state == RunnerState.DRAINING and code == 0:
            self._finish(pool, runner, RunnerState.TERMINATED, "drained and exited")
        elif runner.stop_task is None and runner.info.state not in (
            RunnerState.TERMINATED, RunnerState.FAILED,
        ):  # fmt: skip
            self._book.log(runner.info, "ERROR",
                      f"runner {runner.info.id} exited unexpectedly with code {code}")  # fmt: skip
            self._finish(pool, runner, RunnerState.FAILED, f"exit code {code}")
            self._scale_up(pool)

    def _request_stop(self, runner: _Runner) -> asyncio.Task[None]:
        if runner.stop_task is None:
            runner.stop_task = asyncio.create_task(self._stop(runner))
        return runner.stop_task

    async def _stop(self, runner: _Runner) -> None:
        pool = self._pools.get((runner.info.owner, runner.info.app))
        if runner.info.state not in (RunnerState.TERMINATED, RunnerState.FAILED):
            self._book.set_state(runner, RunnerState.DRAINING)
        if runner.handle is None and runner.boot is not None and not runner.boot.done():
            runner.boot.cancel()
            await asyncio.gather(runner.boot, return_exceptions=True)
        elif runner.handle is not None:
            await (runner.backend or self._backend).stop(runner.handle, runner.grace)
        self._finish(pool, runner, RunnerState.TERMINATED, "stopped")

    def _finish(self, pool: Pool | None, runner: _Runner, state: RunnerState, why: str) -> None:
        """Forget an ended runner (idempotent): free its GPUs, record and log the end."""
        if self._by_id.pop(runner.info.id, None) is None:
            return
        if pool is not None:
            pool.runners.pop(runner.info.id, None)
        if self._gpus is not None:
            self._gpus.release(runner.info.id)
        if runner.health is not None and runner.health is not asyncio.current_task():
            runner.health.cancel()
        self._book.set_state(runner, state, why)
        self._book.record(runner.info, ended=True)
        if not runner.ready.done():
            runner.ready.set_result(RunnerStartError(runner.info.id, why))

    # -- RunnerEvents (called by the backend) -------------------------------------------

    def on_state(self, runner_id: str, state: RunnerState, detail: str = "") -> None:
        runner = self._by_id.get(runner_id)
        if runner is not None and state in _STARTING:
            self._book.set_state(runner, state, detail)  # IDLE and the ends are ours to decide
        elif runner is not None and state == RunnerState.DRAINING and runner.stop_task is None:
            self._drained_by_signal(runner)

    def _drained_by_signal(self, runner: _Runner) -> None:
        """The runner got a SIGTERM from elsewhere: route nothing new to it; it finishes its
        requests, and the fleet stops it once they are done (or at once if it has none)."""
        if runner.info.state not in _SERVING:
            return
        self._book.set_state(runner, RunnerState.DRAINING, "the runner got SIGTERM")
        pool = self._pools.get((runner.info.owner, runner.info.app))
        if runner.info.in_flight == 0:
            self._request_stop(runner)
        if pool is not None:
            self._scale_up(pool)

    def on_log(self, runner_id: str, stream: str, line: str) -> None:
        runner = self._by_id.get(runner_id)
        if runner is not None:
            self._book.runner_line(runner, stream, line)

    # -- health ------------------------------------------------------------------

    async def _probe_once(self, pool: Pool | None, runner: _Runner) -> None:
        opts = pool.options() if pool is not None else {}
        check = opts.get("health_check") or PROBE_DEFAULT
        if not await self._health.ok(runner, check):
            self._replace(pool, runner, "its health check failed after a 500/502 answer")

    def _replace(self, pool: Pool | None, runner: _Runner, why: str) -> None:
        """Take an unhealthy runner out of service: DRAINING, stopped, a new one if needed."""
        if runner.stop_task is not None or runner.info.id not in self._by_id:
            return
        self._book.log(runner.info, "WARNING", f"runner {runner.info.id} is unhealthy ({why}): "
                  "replacing it")  # fmt: skip
        self._book.set_state(runner, RunnerState.DRAINING, why)
        self._request_stop(runner)
        if pool is not None:
            self._apply(pool, time.time())  # waiters and min_concurrency get a new runner

    # -- the keep-alive loop ------------------------------------------------------------

    async def _scale_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            for pool in list(self._pools.values()):
                self._apply(pool, time.time())

    def _apply(self, pool: Pool, now: float) -> None:
        if pool.closed or pool.revision is None:
            return
        settings = ScaleSettings.from_options(pool.options())
        live = {r.info.id: r for r in pool.live()}
        # other revisions' runners (staged by ensure_runner) age out the same way
        decision = scaler.decide(settings, self._load(pool, backlog=True), now)
        for rid in decision.stop:
            idle = now - live[rid].info.last_used >= settings.keep_alive
            why = "idle past keep_alive" if idle else "above max_concurrency"
            self._book.log(live[rid].info, "INFO", f"runner {rid} {why}: stopping")
            self._request_stop(live[rid])
        if now >= pool.retry_at:  # an app whose setup keeps failing is not restarted in a loop
            for _ in range(decision.start):
                self._spawn(pool, pool.revision)


def _runtime_of(revision: RevisionRecord) -> tuple[str, ...]:
    return (revision.bundle_hash, revision.env_key, revision.image, revision.python,
            revision.workdir, revision.payload)  # fmt: skip
