"""The dispatcher: moves queued requests onto runners, retries them, writes their results.

Per app, a *lane* of dispatch tasks, as many as the fleet can run at once
(``max_concurrency x max_multiplexing``). A task claims the app's next request (priority,
then FIFO; the claim is the new attempt), takes a runner slot from the fleet (a warm one, or
it waits for a cold start), marks the row RUNNING, sends the request and applies
``retry.decide`` to the answer: retried requests go back in line with the runner released as
broken (the fleet replaces it), others get their terminal result by compare-and-set on
``(id, attempt)``. Idle tasks park on a future; a submit wakes exactly one, so a warm runner
starts a new request within a few milliseconds.

Leases: a claimed row carries ``lease_until``, renewed while its attempt runs. A reaper
puts rows whose lease ran out back in line, and ``start()`` puts back every leased row (the
runners of a previous service process died with it): at-least-once execution, exactly one
terminal result per request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import aiohttp

from buildsvc.fleet import AppStopped, Fleet, Lease, NoRunnerAvailable
from buildsvc.logs import LogHub, LogRecord
from buildsvc.queue.attempt import Answer, call_runner, error_result
from buildsvc.queue.retry import MAX_ATTEMPTS, Failure, Policy, decide
from buildsvc.queue.store import QueuedRequest, QueueStore, Result, RowState
from buildsvc.queue.webhooks import WebhookSender
from buildsvc.records import AppRecord, RevisionRecord
from buildsvc.runtime.base import RunnerStartError

__all__ = ["CancelOutcome", "Dispatcher", "QueueSettings"]

_log = logging.getLogger("buildsvc.queue")
_USER_TIMEOUT = (("x-fal-request-timeout-type", "user"),)
_FAILURE_STATUS = {Failure.CONNECT: 503, Failure.DISCONNECT: 503, Failure.TIMEOUT: 504}
_MAX_LANE = 256  # dispatch tasks per app, whatever its scale settings say


@dataclass(frozen=True)
class QueueSettings:
    lease_seconds: float = 30.0
    max_attempts: int = MAX_ATTEMPTS
    default_request_timeout: float = 3600.0
    retention_seconds: float = 7 * 24 * 3600.0  # how long finished requests stay readable
    max_body_bytes: int = 64 * 1024**2  # a submit's body; larger ones get 413
    max_depth: int = 100_000  # unfinished requests per app; a submit beyond gets 429 (0: none)


class CancelOutcome(StrEnum):
    NOT_FOUND = "NOT_FOUND"
    ALREADY_COMPLETED = "ALREADY_COMPLETED"
    REQUESTED = "CANCELLATION_REQUESTED"


@dataclass(eq=False)
class _Lane:
    owner: str
    app: str
    workers: set[asyncio.Task[None]] = field(default_factory=set)
    idle: deque[asyncio.Future[None]] = field(default_factory=deque)


class Dispatcher:
    """Runs queued requests; see the module docstring."""

    def __init__(
        self,
        *,
        store: QueueStore,
        apps: Any,
        fleet: Fleet,
        logs: LogHub,
        session: Callable[[], aiohttp.ClientSession],
        webhooks: WebhookSender,
        settings: QueueSettings | None = None,
    ) -> None:
        self._store, self._apps, self._fleet, self._logs = store, apps, fleet, logs
        self._session, self._webhooks = session, webhooks
        self._settings = settings or QueueSettings()
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._active: dict[str, asyncio.Task[None]] = {}  # request id -> its serving task
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self._reaper: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Put back what a previous process left leased, then serve every waiting app."""
        recovered = self._store.expire_leases(math.inf)
        if recovered:
            _log.info("put %d interrupted request(s) back in the queue", len(recovered))
        for owner, app in self._store.pending_apps():
            self.wake(owner, app)
        self._webhooks.resume()
        self._reaper = asyncio.create_task(self._reap_loop())

    async def close(self) -> None:
        """Stop dispatching; rows in flight stay leased and are put back on the next start."""
        tasks = [t for lane in self._lanes.values() for t in lane.workers]
        if self._reaper is not None:
            tasks.append(self._reaper)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._lanes.clear()
        await self._webhooks.close()

    # -- what the service calls ---------------------------------------------------------

    def wake(self, owner: str, app: str) -> None:
        """A request of ``owner/app`` is waiting: get an idle dispatch task onto it."""
        lane = self._lanes.get((owner, app))
        if lane is None:
            lane = self._lanes[(owner, app)] = _Lane(owner, app)
        self._grow(lane)
        while lane.idle:
            parked = lane.idle.popleft()
            if not parked.done():
                parked.set_result(None)
                return

    def cancel(self, request_id: str) -> CancelOutcome:
        """Cancel a request: a queued one never runs, a running one ends client_cancelled."""
        request = self._store.get(request_id)
        if request is None:
            return CancelOutcome.NOT_FOUND
        if request.state == RowState.DONE:
            return CancelOutcome.ALREADY_COMPLETED
        task = self._active.get(request_id)
        if task is not None and not task.done():
            task.cancel()  # closes the upstream connection; the lane writes the result
        elif request.state == RowState.QUEUED:
            self._finish(request, None, _cancelled())
        else:  # leased, but nobody here serves it (a lost lease): end it all the same
            self._finish(request, request.attempt, _cancelled())
        return CancelOutcome.REQUESTED

    def watch(self, request_id: str) -> asyncio.Event:
        """An event set at each state change of the request (for the status stream)."""
        event = asyncio.Event()
        self._watchers.setdefault(request_id, set()).add(event)
        return event

    def unwatch(self, request_id: str, event: asyncio.Event) -> None:
        events = self._watchers.get(request_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._watchers[request_id]

    # -- the lanes ----------------------------------------------------------------------

    def _grow(self, lane: _Lane) -> None:
        want = min(_MAX_LANE, self._capacity(lane.owner, lane.app))
        while len(lane.workers) < want:
            task = asyncio.create_task(self._work(lane))
            lane.workers.add(task)
            task.add_done_callback(lane.workers.discard)

    def _capacity(self, owner: str, app: str) -> int:
        resolved = self._apps.resolve(owner, app)
        if resolved is None or resolved[1] is None:
            return 1  # one task is enough to answer "app not found"
        opts = {**resolved[1].manifest.get("options", {}), **(resolved[0].scale or {})}
        return max(1, int(opts.get("max_concurrency") or 10)) * max(
            1, int(opts.get("max_multiplexing") or 1)
        )

    async def _work(self, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        while True:
            request = self._store.claim(lane.owner, lane.app, self._lease_end())
            if request is None:
                parked = loop.create_future()
                lane.idle.append(parked)
                await parked
                continue
            await self._serve_guarded(request)

    async def _serve_guarded(self, request: QueuedRequest) -> None:
        """Serve one claimed request in its own task, so that ``cancel`` can interrupt it."""
        task = asyncio.create_task(self._serve(request))
        self._active[request.id] = task
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the service is stopping: the row stays leased, recovered on start
            self._finish(request, request.attempt, _cancelled())
        except Exception:
            _log.exception("queued request %s failed inside the dispatcher", request.id)
            detail = f"request {request.id} failed inside the queue dispatcher: see the service log"
            self._finish(request, request.attempt, error_result(500, detail, "internal_error"))
        finally:
            self._active.pop(request.id, None)

    # -- one attempt --------------------------------------------------------------------

    async def _serve(self, request: QueuedRequest) -> None:
        if request.attempt > self._settings.max_attempts:
            detail = (f"request {request.id} was interrupted {request.attempt - 1} times "
                      "(runner or service restarts); giving up: submit it again")  # fmt: skip
            self._finish(request, request.attempt, error_result(503, detail, "runner_disconnected"))
            return
        resolved = self._resolve(request)
        if resolved is None:
            return
        lease = await self._acquire(request, *resolved)
        if lease is None:
            return
        broken = True  # an unexpected error: do not trust that runner again
        try:
            broken = await self._run(request, lease, resolved[1])
        except asyncio.CancelledError:
            broken = False  # a cancelled request, or the service stopping: the runner is fine
            raise
        finally:
            await lease.release(broken=broken)

    def _resolve(self, request: QueuedRequest) -> tuple[AppRecord, RevisionRecord] | None:
        resolved = self._apps.resolve(request.owner, request.app)
        if resolved is None or resolved[1] is None:
            detail = (f"App '{request.owner}/{request.app}' is gone or has no deployed "
                      "revision: deploy it with `fal deploy`, then submit again")  # fmt: skip
            self._finish(request, request.attempt, error_result(404, detail, "app_not_found"))
            return None
        return resolved[0], resolved[1]

    async def _acquire(
        self, request: QueuedRequest, app: AppRecord, revision: RevisionRecord
    ) -> Lease | None:
        remaining = None if request.deadline is None else request.deadline - time.time()
        try:
            if remaining is not None and remaining <= 0:
                raise NoRunnerAvailable("no time left")
            return await self._fleet.acquire(
                app, revision, hint=request.hint, timeout=remaining, request_id=request.id
            )
        except NoRunnerAvailable:
            self._finish(request, request.attempt, _user_timeout(request))
        except RunnerStartError as exc:
            detail = f"App '{app.owner}/{app.name}' failed to start: {exc.reason}"
            tail = (exc.detail or "")[-4000:]
            result = error_result(503, detail + (f"\n{tail}" if tail else ""), "startup_error")
            self._finish(request, request.attempt, result)
        except AppStopped as exc:
            self._finish(request, request.attempt,
                         error_result(404, f"{exc}: deploy it again", "app_not_found"))  # fmt: skip
        return None

    async def _run(self, request: QueuedRequest, lease: Lease, revision: RevisionRecord) -> bool:
        """Run one attempt on ``lease``'s runner; True when the runner must be replaced."""
        runner = lease.runner
        if not self._store.start(request.id, request.attempt, runner.id, self._lease_end()):
            return False  # the row moved on while we waited for a runner (lease lost)
        self._notify(request.id)
        answer = await self._attempt(request, runner.url or "", revision)
        options = revision.manifest.get("options", {})
        policy = Policy(
            skip_conditions=frozenset(options.get("skip_retry_conditions") or ()),
            no_retry=request.no_retry, max_attempts=self._settings.max_attempts,
        )  # fmt: skip
        decision = decide(answer.attempt, request.attempt, policy)
        if answer.attempt.status in (500, 502):  # not retried, but is the runner still sane?
            self._fleet.probe(runner.id)
        if decision.retry:
            self._retry(request, runner.id, decision.reason, decision.error_type or "")
        else:
            self._finish(request, request.attempt, self._final(request, answer, runner.id,
                                                               decision.error_type))  # fmt: skip
        return decision.broken

    async def _attempt(self, request: QueuedRequest, url: str, revision: RevisionRecord) -> Answer:
        heartbeat = asyncio.create_task(self._heartbeat(request))
        try:
            return await call_runner(self._session(), url, request, self._timeout(revision))
        finally:
            heartbeat.cancel()

    def _retry(self, request: QueuedRequest, runner_id: str, reason: str, error_type: str) -> None:
        if request.deadline is not None and time.time() >= request.deadline:
            self._finish(request, request.attempt, _user_timeout(request))
            return
        self._log(request, "WARNING", f"attempt {request.attempt} on runner {runner_id} "
                  f"failed ({error_type}): {reason}")  # fmt: skip
        if self._store.requeue(request.id, request.attempt):
            self._notify(request.id)
            self.wake(request.owner, request.app)

    def _final(
        self, request: QueuedRequest, answer: Answer, runner_id: str, error_type: str | None
    ) -> Result:
        if answer.result is not None:
            return answer.result
        failure = answer.attempt.failure or Failure.DISCONNECT
        detail = (f"attempt {request.attempt} of request {request.id} on runner {runner_id} "
                  f"failed ({failure}) and is not retried")  # fmt: skip
        return error_result(_FAILURE_STATUS[failure], detail, error_type or "runner_disconnected")

    # -- bookkeeping --------------------------------------------------------------------

    def _finish(self, request: QueuedRequest, attempt: int | None, result: Result) -> bool:
        """Write the terminal result (compare-and-set); a stale attempt's write is dropped."""
        if not self._store.finish(request.id, attempt, result):
            _log.info("dropped the answer of attempt %s of request %s: it lost its lease",
                      attempt, request.id)  # fmt: skip
            return False
        if not result.ok:
            self._log(request, "WARNING", f"request failed: {result.error_type}: {result.error}")
        self._notify(request.id)
        if request.webhook is not None:
            finished = self._store.get(request.id)
            if finished is not None:
                self._webhooks.deliver(finished)
        return True

    def _notify(self, request_id: str) -> None:
        for event in self._watchers.get(request_id, ()):
            event.set()

    async def _heartbeat(self, request: QueuedRequest) -> None:
        while True:
            await asyncio.sleep(self._settings.lease_seconds / 3)
            if not self._store.renew(request.id, request.attempt, self._lease_end()):
                return

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.lease_seconds / 2)
            with contextlib.suppress(Exception):  # a busy database must not end the loop
                self._reap(time.time())

    def _reap(self, now: float) -> None:
        self._store.purge(now - self._settings.retention_seconds)
        for request_id in self._store.expire_leases(now):
            request = self._store.get(request_id)
            if request is not None:
                _log.warning("lease of request %s expired: back in the queue", request_id)
                self._notify(request_id)
                self.wake(request.owner, request.app)

    def _lease_end(self) -> float:
        return time.time() + self._settings.lease_seconds

    def _timeout(self, revision: RevisionRecord) -> aiohttp.ClientTimeout:
        options = revision.manifest.get("options", {})
        seconds = float(options.get("request_timeout") or self._settings.default_request_timeout)
        found = self._timeouts.get(seconds)
        if found is None:
            found = self._timeouts[seconds] = aiohttp.ClientTimeout(total=seconds,
                                                                   sock_connect=10.0)  # fmt: skip
        return found

    def _log(self, request: QueuedRequest, level: str, message: str) -> None:
        self._logs.emit(LogRecord(
            timestamp=time.time(), level=level, source="gateway", owner=request.owner,
            app=request.app, runner_id=None, request_id=request.id, message=message,
        ))  # fmt: skip


def _cancelled() -> Result:
    return error_result(499, "the request was cancelled by its caller", "client_cancelled")


def _user_timeout(request: QueuedRequest) -> Result:
    detail = (f"request {request.id} did not start within its X-Fal-Request-Timeout: raise "
              "the timeout, or retry when the app is less busy")  # fmt: skip
    return error_result(504, detail, "request_timeout", _USER_TIMEOUT)
