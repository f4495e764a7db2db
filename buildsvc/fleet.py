"""The fleet: the runners of every app, who serves the next request, and when runners stop.

One ``_Pool`` per app holds its runners (tagged with their revision) and a FIFO of requests
waiting for a slot. ``acquire`` takes a free slot of a current-revision runner (preferring one
whose remembered ``X-Fal-Runner-Hints`` contain the caller's hint, else the least loaded); if
there is none the request queues and, while waiting requests outnumber the slots of runners
already starting and the app is under ``max_concurrency``, a cold start begins. A released
slot is handed straight to the oldest waiter, so waiters are served in order and a request
arriving later cannot overtake them.

A background loop applies the pure policy of ``buildsvc.scaler`` (runners, waiting requests,
the queue's backlog and the app's live scale settings -> runners to start and to stop), and
so does every new waiter, so a cold start begins at once unless ``scaling_delay`` says wait.
Runner states: PENDING -> SETUP -> IDLE <-> RUNNING -> DRAINING -> TERMINATED, or FAILED. A
runner that reports DRAINING by itself (it got a SIGTERM) takes no new request.

Health: with ``health_check.call_regularly`` every runner's path is probed (GET, non-2xx or
timeout is a failure, counted once the runner is ``start_period_seconds`` old); after
``failure_threshold`` failures in a row it is replaced. ``probe`` checks a runner once (the
gateway and the queue call it after a 500 or 502).

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
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from buildsvc import scaler
from buildsvc.logs import LogHub, LogRecord
from buildsvc.records import AppRecord, RevisionRecord, RunnerRecord
from buildsvc.runtime.base import (
    RunnerHandle,
    RunnerSpec,
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

_DEFAULTS = {"keep_alive": 10, "min_concurrency": 0, "max_concurrency": 10, "max_multiplexing": 1}
_SERVING = (RunnerState.IDLE, RunnerState.RUNNING)
_STARTING = (RunnerState.PENDING, RunnerState.SETUP)
_MAX_BACKOFF = 60.0  # seconds between keep-warm retries of an app that fails to start
_HEALTH_INTERVAL = 10.0  # seconds between regular health probes (config: fleet.health_interval)
_PROBE_DEFAULT = {"path": "/health", "timeout_seconds": 5}  # a one-off probe without a config


class FleetError(Exception):
    """Base of the errors ``Fleet.acquire`` raises on purpose."""


class NoRunnerAvailable(FleetError, TimeoutError):
    pass


class AppStopped(FleetError):
    pass


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


# -- bookkeeping -------------------------------------------------------------------------


@dataclass(eq=False)
class _Runner:
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


@dataclass(eq=False)
class _Waiter:
    fut: asyncio.Future[_Runner | BaseException]
    request_id: str | None
    since: float = field(default_factory=time.time)


@dataclass(eq=False)
class _Pool:
    app: AppRecord
    revision: RevisionRecord | None = None  # the revision that serves traffic
    runners: dict[str, _Runner] = field(default_factory=dict)
    waiters: deque[_Waiter] = field(default_factory=deque)
    closed: bool = False
    failures: int = 0  # cold starts failed in a row: the keep-warm loop backs off
    retry_at: float = 0.0

    def options(self, revision: RevisionRecord | None = None) -> dict[str, Any]:
        rev = revision or self.revision
        manifest_opts = rev.manifest.get("options", {}) if rev else {}
        merged = {**_DEFAULTS, **manifest_opts, **(self.app.scale or {})}
        return {k: (_DEFAULTS[k] if merged[k] is None and k in _DEFAULTS else v)
                for k, v in merged.items()}  # fmt: skip

    def live(self) -> list[_Runner]:
        """Runners that count against max_concurrency: not stopping, not ended."""
        return [r for r in self.runners.values() if r.stop_task is None
                and r.info.state not in (RunnerState.DRAINING, RunnerState.TERMINATED,
                                         RunnerState.FAILED)]  # fmt: skip


class Lease:
    """One slot on one runner; ``release`` gives it back (``broken=True`` replaces it)."""

    __slots__ = ("_fleet", "_pool", "_runner", "_released", "runner")

    def __init__(self, fleet: Fleet, pool: _Pool, runner: _Runner) -> None:
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
        self._health_interval = float(extra.get("fleet.health_interval", _HEALTH_INTERVAL))
        self._pools: dict[tuple[str, str], _Pool] = {}
        self._by_id: dict[str, _Runner] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._backlog: Callable[[str, str], int] | None = None  # the queue's pending rows
        self._on_scale: Callable[[str, str], None] | None = None
        self._probes: aiohttp.ClientSession | None = None

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
        if self._probes is not None:
            await self._probes.close()
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
            runner = self._pick(pool, hint)
            if runner is not None:
                self._take(runner, request_id)
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

    def _pool(self, app: AppRecord) -> _Pool:
        pool = self._pools.get((app.owner, app.name))
        if pool is None:
            pool = self._pools[(app.owner, app.name)] = _Pool(app)
        elif pool.app is not app:
            pool.app = app  # the store hands out a new record after every write
        return pool

    def _pick(self, pool: _Pool, hint: str | None) -> _Runner | None:
        rev = pool.revision.id if pool.revision else None
        best: _Runner | None = None
        for r in pool.runners.values():
            info = r.info
            if info.revision != rev or info.state not in _SERVING or r.stop_task is not None:
                continue
            if info.in_flight >= r.max_multiplexing:
                continue
            if hint is not None and hint in r.hints:
                return r
            if best is None or info.in_flight < best.info.in_flight:
                best = r
        return best

    def _take(self, runner: _Runner, request_id: str | None) -> None:
        runner.info.in_flight += 1
        runner.info.state = RunnerState.RUNNING
        runner.request_id = request_id if runner.max_multiplexing == 1 else None

    async def _wait(self, pool: _Pool, timeout: float | None, request_id: str | None) -> Lease:
        waiter = _Waiter(asyncio.get_running_loop().create_future(), request_id)
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

    def _abandon(self, pool: _Pool, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):
            pool.waiters.remove(waiter)
        fut = waiter.fut
        got = fut.result() if fut.done() and not fut.cancelled() else None
        if isinstance(got, _Runner):
            self._release(pool, got, broken=False)  # a slot handed over too late

    def _hand_off(self, pool: _Pool, runner: _Runner) -> None:
        """Give the runner's free slots to the oldest waiters."""
        while pool.waiters and runner.info.in_flight < runner.max_multiplexing:
            waiter = pool.waiters.popleft()
            if not waiter.fut.done():
                self._take(runner, waiter.request_id)
                waiter.fut.set_result(runner)

    def _release(self, pool: _Pool, runner: _Runner, broken: bool) -> None:
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

    def _scale_up(self, pool: _Pool) -> None:
        """Cold-start what the policy wants for the waiting requests, now: the keep-alive
        loop would only see them a tick later (it also adds the queue's backlog)."""
        if pool.closed or pool.revision is None or not pool.waiters:
            return
        settings = ScaleSettings.from_options(pool.options())
        decision = scaler.decide(settings, self._load(pool, backlog=False), time.time())
        for _ in range(decision.start):
            self._spawn(pool, pool.revision)

    def _load(self, pool: _Pool, *, backlog: bool) -> AppLoad:
        runners = [RunnerLoad(r.info.id, r.info.in_flight, r.info.last_used,
                              r.info.state in _STARTING) for r in pool.live()]  # fmt: skip
        waiting = len(pool.waiters)
        if backlog and self._backlog is not None:
            try:
                waiting += self._backlog(pool.app.owner, pool.app.name)
            except Exception:  # a closing queue database must not stop the loop
                pass
        return AppLoad(runners, waiting, pool.waiters[0].since if pool.waiters else None)

    def _switch(self, pool: _Pool, revision: RevisionRecord, strategy: str) -> list[_Runner]:
        """Make ``revision`` the serving one; drain the runners of other revisions."""
        pool.revision = revision
        old = [r for r in pool.runners.values() if r.info.revision != revision.id]
        for r in old:
            if r.stop_task is None and (strategy == "recreate" or r.info.in_flight == 0):
                self._request_stop(r)
            elif r.info.state in (*_SERVING, *_STARTING):
                self._set_state(r, RunnerState.DRAINING, "a new revision serves traffic")
        self._scale_up(pool)
        return old

    def _close_pool(self, pool: _Pool) -> None:
        pool.closed = True
        error = AppStopped(f"app {pool.app.owner}/{pool.app.name} was stopped")
        while pool.waiters:
            waiter = pool.waiters.popleft()
            if not waiter.fut.done():
                waiter.fut.set_result(error)

    # -- starting and stopping runners --------------------------------------------------

    def _spawn(self, pool: _Pool, revision: RevisionRecord) -> _Runner:
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
        self._log(info, "INFO", f"runner {info.id} starting (revision {revision.id})")
        self._record(info)
        runner.boot = asyncio.create_task(self._boot(pool, runner, revision, opts))
        return runner

    async def _boot(
        self, pool: _Pool, runner: _Runner, revision: RevisionRecord, opts: dict[str, Any]
    ) -> None:
        try:
            spec = self._spec(runner, revision, opts)
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
        self._set_state(runner, RunnerState.IDLE)
        runner.info.last_used = time.time()
        runner.ready.set_result(None)
        pool.failures = 0
        runner.watch = asyncio.create_task(self._watch(pool, runner, handle))
        check = opts.get("health_check")
        if isinstance(check, dict) and check.get("call_regularly"):
            runner.health = asyncio.create_task(self._probe_loop(pool, runner, check))
        if runner.stop_task is None and pool.revision and revision.id == pool.revision.id:
            self._hand_off(pool, runner)
            if runner.info.in_flight:
                runner.info.state = RunnerState.RUNNING

    def _spec(self, runner: _Runner, revision: RevisionRecord, opts: dict[str, Any]) -> RunnerSpec:
        rid = runner.info.id
        gpu_ids: list[int] = []
        wanted = int(opts.get("num_gpus") or 0)
        if wanted > 0 and self._gpus is not None:
            try:
                gpu_ids = list(self._gpus.allocate(rid, wanted))
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

    def _boot_failed(self, pool: _Pool, runner: _Runner, exc: RunnerStartError) -> None:
        tail = exc.detail[-4000:] if exc.detail else ""
        self._log(runner.info, "ERROR", f"runner {runner.info.id} failed to start: "
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

    async def _watch(self, pool: _Pool, runner: _Runner, handle: RunnerHandle) -> None:
        code = await (runner.backend or self._backend).wait(handle)
        if runner.stop_task is None and runner.info.state == RunnerState.DRAINING and code == 0:
            self._finish(pool, runner, RunnerState.TERMINATED, "drained and exited")
        elif runner.stop_task is None and runner.info.state not in (
            RunnerState.TERMINATED, RunnerState.FAILED,
        ):  # fmt: skip
            self._log(runner.info, "ERROR",
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
            self._set_state(runner, RunnerState.DRAINING)
        if runner.handle is None and runner.boot is not None and not runner.boot.done():
            runner.boot.cancel()
            await asyncio.gather(runner.boot, return_exceptions=True)
        elif runner.handle is not None:
            await (runner.backend or self._backend).stop(runner.handle, runner.grace)
        self._finish(pool, runner, RunnerState.TERMINATED, "stopped")

    def _finish(self, pool: _Pool | None, runner: _Runner, state: RunnerState, why: str) -> None:
        """Forget an ended runner (idempotent): free its GPUs, record and log the end."""
        if self._by_id.pop(runner.info.id, None) is None:
            return
        if pool is not None:
            pool.runners.pop(runner.info.id, None)
        if self._gpus is not None:
            self._gpus.release(runner.info.id)
        if runner.health is not None and runner.health is not asyncio.current_task():
            runner.health.cancel()
        self._set_state(runner, state, why)
        self._record(runner.info, ended=True)
        if not runner.ready.done():
            runner.ready.set_result(RunnerStartError(runner.info.id, why))

    # -- RunnerEvents (called by the backend) -------------------------------------------

    def on_state(self, runner_id: str, state: RunnerState, detail: str = "") -> None:
        runner = self._by_id.get(runner_id)
        if runner is not None and state in _STARTING:
            self._set_state(runner, state, detail)  # IDLE and the ends are ours to decide
        elif runner is not None and state == RunnerState.DRAINING and runner.stop_task is None:
            self._drained_by_signal(runner)

    def _drained_by_signal(self, runner: _Runner) -> None:
        """The runner got a SIGTERM from elsewhere: route nothing new to it; it finishes its
        requests, and the fleet stops it once they are done (or at once if it has none)."""
        if runner.info.state not in _SERVING:
            return
        self._set_state(runner, RunnerState.DRAINING, "the runner got SIGTERM")
        pool = self._pools.get((runner.info.owner, runner.info.app))
        if runner.info.in_flight == 0:
            self._request_stop(runner)
        if pool is not None:
            self._scale_up(pool)

    def on_log(self, runner_id: str, stream: str, line: str) -> None:
        runner = self._by_id.get(runner_id)
        if runner is None:
            return
        info = runner.info
        self._logs.emit(LogRecord(
            timestamp=time.time(), level=stream.upper(), source="runner", owner=info.owner,
            app=info.app, runner_id=runner_id, request_id=self._log_request_id(runner),
            message=line.rstrip("\n"),
        ))  # fmt: skip

    def _log_request_id(self, runner: _Runner) -> str | None:
        # Output reaches us through a pipe, often just after the response went out over TCP,
        # so a line that arrives shortly after the last request still belongs to it.
        info = runner.info
        if info.in_flight == 1 or (info.in_flight == 0 and time.time() - info.last_used < 1.0):
            return runner.request_id
        return None

    # -- health checks ------------------------------------------------------------------

    async def _probe_loop(self, pool: _Pool, runner: _Runner, check: dict[str, Any]) -> None:
        failures = 0
        threshold = max(1, int(check.get("failure_threshold") or 3))
        start_period = float(check.get("start_period_seconds") or 0)
        while runner.stop_task is None and runner.info.id in self._by_id:
            await asyncio.sleep(self._health_interval)
            if runner.stop_task is not None or runner.info.state not in _SERVING:
                return
            if await self._probe_ok(runner, check):
                failures = 0
            elif time.time() - runner.info.started_at >= start_period:
                failures += 1
                if failures >= threshold:
                    self._replace(pool, runner, f"failed {failures} health checks in a row")
                    return

    async def _probe_once(self, pool: _Pool | None, runner: _Runner) -> None:
        opts = pool.options() if pool is not None else {}
        check = opts.get("health_check") or _PROBE_DEFAULT
        if not await self._probe_ok(runner, check):
            self._replace(pool, runner, "its health check failed after a 500/502 answer")

    async def _probe_ok(self, runner: _Runner, check: dict[str, Any]) -> bool:
        """GET the health path: a 2xx within ``timeout_seconds`` is healthy."""
        if self._probes is None or self._probes.closed:
            self._probes = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        timeout = aiohttp.ClientTimeout(total=float(check.get("timeout_seconds") or 5))
        try:
            url = f"{runner.info.url}{check.get('path') or '/health'}"
            async with self._probes.get(url, timeout=timeout, allow_redirects=False) as resp:
                return 200 <= resp.status < 300
        except (aiohttp.ClientError, TimeoutError):
            return False

    def _replace(self, pool: _Pool | None, runner: _Runner, why: str) -> None:
        """Take an unhealthy runner out of service: DRAINING, stopped, a new one if needed."""
        if runner.stop_task is not None or runner.info.id not in self._by_id:
            return
        self._log(runner.info, "WARNING", f"runner {runner.info.id} is unhealthy ({why}): "
                  "replacing it")  # fmt: skip
        self._set_state(runner, RunnerState.DRAINING, why)
        self._request_stop(runner)
        if pool is not None:
            self._apply(pool, time.time())  # waiters and min_concurrency get a new runner

    # -- the keep-alive loop ------------------------------------------------------------

    async def _scale_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            for pool in list(self._pools.values()):
                self._apply(pool, time.time())

    def _apply(self, pool: _Pool, now: float) -> None:
        if pool.closed or pool.revision is None:
            return
        settings = ScaleSettings.from_options(pool.options())
        live = {r.info.id: r for r in pool.live()}
        # other revisions' runners (staged by ensure_runner) age out the same way
        decision = scaler.decide(settings, self._load(pool, backlog=True), now)
        for rid in decision.stop:
            idle = now - live[rid].info.last_used >= settings.keep_alive
            why = "idle past keep_alive" if idle else "above max_concurrency"
            self._log(live[rid].info, "INFO", f"runner {rid} {why}: stopping")
            self._request_stop(live[rid])
        if now >= pool.retry_at:  # an app whose setup keeps failing is not restarted in a loop
            for _ in range(decision.start):
                self._spawn(pool, pool.revision)

    # -- state, logs, history -----------------------------------------------------------

    def _set_state(self, runner: _Runner, state: RunnerState, detail: str = "") -> None:
        info = runner.info
        if info.state == state:
            return
        quiet = state in _SERVING and info.state in _SERVING  # per-request flips stay silent
        info.state = state
        if not quiet:
            message = f"runner {info.id} {state}" + (f": {detail}" if detail else "")
            level = "ERROR" if state == RunnerState.FAILED else "INFO"
            self._log(info, level, message)
            self._record(info)

    def _log(self, info: RunnerInfo, level: str, message: str) -> None:
        self._logs.emit(LogRecord(
            timestamp=time.time(), level=level, source="service", owner=info.owner,
            app=info.app, runner_id=info.id, request_id=None, message=message,
        ))  # fmt: skip

    def _record(self, info: RunnerInfo, ended: bool = False) -> None:
        record = RunnerRecord(
            id=info.id, owner=info.owner, app=info.app, revision=info.revision,
            state=str(info.state), pid=info.pid, url=info.url, started_at=info.started_at,
            ended_at=time.time() if ended else None,
        )  # fmt: skip
        try:
            self._store.record_runner(record)
        except Exception:  # history is best effort; a closed store at shutdown is not fatal
            pass
