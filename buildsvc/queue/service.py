"""The queue's HTTP face: a raw ASGI app for every path under ``/queue``.

    POST /queue/{owner}/{app}[/{path}][?fal_webhook=URL]     submit -> request_id + URLs
    GET  /queue/{owner}/{app}/requests/{id}/status[?logs=1]  IN_QUEUE | IN_PROGRESS | COMPLETED
    GET  /queue/{owner}/{app}/requests/{id}/status/stream    SSE of statuses until COMPLETED
    GET  /queue/{owner}/{app}/requests/{id}                  the result; 202 until finished
    PUT  /queue/{owner}/{app}/requests/{id}/cancel           202, 400 when already finished

Shapes follow /work/shared/reference/wire-protocol.md. Auth is the app's auth mode, checked
exactly as the sync gateway does (``Keyring.authorize``), on every call, so one caller cannot
read another's results of a private app. The caller's credentials are never stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

from buildsvc.gateway._wire import HOP_BY_HOP, Receive, Refused, Scope, Send, send_error
from buildsvc.logs import LogHub
from buildsvc.queue.dispatcher import CancelOutcome, Dispatcher
from buildsvc.queue.store import QueuedRequest, QueueStore, RowState
from buildsvc.records import AppRecord

__all__ = ["PREFIX", "QueueService"]

PREFIX = "/queue"
_PRIORITIES = {"normal": 0, "low": 1}
_NOT_STORED = HOP_BY_HOP | {
    b"host", b"authorization", b"content-length", b"cookie", b"x-fal-request-id",
    b"x-fal-queue-priority", b"x-fal-request-timeout", b"x-fal-no-retry", b"x-fal-runner-hint",
}  # fmt: skip
_LATE_LOGS = 1.0  # seconds after a result in which an untagged runner line is still its own
_STREAM_POLL = 1.0  # seconds between status re-reads of a stream when nothing was signalled
_JSON = (b"content-type", b"application/json")
_OPEN = (RowState.QUEUED, RowState.CLAIMED, RowState.RUNNING)  # what the depth cap counts
_DEPTH_RECOUNT = 0.5  # seconds an app's counted depth is trusted (plus submits since)


class QueueService:
    """ASGI app for ``/queue/...``; the dispatcher does the work, this speaks HTTP."""

    def __init__(
        self,
        *,
        store: QueueStore,
        apps: Any,
        keys: Any,
        logs: LogHub,
        dispatcher: Dispatcher,
        max_body_bytes: int = 64 * 1024 * 1024,
        max_depth: int = 0,
        rate_check: Callable[[Scope, dict[bytes, bytes]], None] | None = None,
    ) -> None:
        self._store, self._apps, self._keys, self._logs = store, apps, keys, logs
        self._dispatcher = dispatcher
        self._max_body = max_body_bytes
        self._commits = _GroupCommit(store)
        self._depth = _DepthGauge(store, max_depth)
        self._rate_check = rate_check  # the gateway's: raises Refused(429)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # websockets have no queue form
        rid = str(uuid.uuid4())  # a submit's request id; on an error, the error's id
        try:
            await self._route(scope, receive, send, rid)
        except Refused as exc:
            await send_error(send, exc.status, exc.detail, exc.error_type, rid, exc.headers)

    async def _route(self, scope: Scope, receive: Receive, send: Send, rid: str) -> None:
        path: str = scope["path"]
        parts = path[len(PREFIX) :].strip("/").split("/") if path.startswith(PREFIX) else []
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise Refused(404, f"Path {path!r} not found: queue calls live at "
                          "/queue/{owner}/{app}[/path], e.g. POST /queue/alice/my-app",
                          "not_found")  # fmt: skip
        method, (owner, app, rest) = scope["method"], (parts[0], parts[1], parts[2:])
        if method == "POST":
            await self._submit(scope, receive, send, (owner, app, rid))
        elif rest[:1] == ["requests"] and len(rest) >= 2:
            await self._request_call(scope, receive, send, (owner, app, rest[1]), rest[2:])
        else:
            raise Refused(405, f"{method} {path}: submit with POST, or call "
                          f"{PREFIX}/{owner}/{app}/requests/{{id}}[/status|/cancel]",
                          "method_not_allowed")  # fmt: skip

    async def _request_call(
        self, scope: Scope, receive: Receive, send: Send, ids: tuple[str, str, str],
        tail: list[str],
    ) -> None:  # fmt: skip
        method = scope["method"]
        request = self._load(scope, *ids)
        if method == "GET" and not tail:
            await self._result(scope, send, request)
        elif method == "GET" and tail == ["status"]:
            await _send_json(send, 200, self._status(scope, request), request.id)
        elif method == "GET" and tail == ["status", "stream"]:
            await self._stream(scope, receive, send, request)
        elif method == "PUT" and tail == ["cancel"]:
            await self._cancel(send, request)
        else:
            raise Refused(405, f"{method} {scope['path']}: not a queue call; see "
                          "GET .../requests/{id}[/status[/stream]] or PUT .../cancel",
                          "method_not_allowed")  # fmt: skip

    # -- submit -------------------------------------------------------------------------

    async def _submit(
        self, scope: Scope, receive: Receive, send: Send, ids: tuple[str, str, str]
    ) -> None:
        owner, name, rid = ids
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.strip().isdigit() and int(length) > self._max_body:
            raise _too_large(self._max_body)  # before reading a byte of it
        self._authorize(self._lookup(owner, name), headers)
        if self._rate_check is not None:
            self._rate_check(scope, headers)
        self._depth.admit(owner, name)
        query, webhook = _split_query(scope.get("query_string") or b"")
        deadline = _deadline(headers.get(b"x-fal-request-timeout"))
        raw_path = scope["path"][len(PREFIX) :].split("/", 3)
        hint = headers.get(b"x-fal-runner-hint")
        request = QueuedRequest(
            id=rid, owner=owner, app=name,
            path="/" + (raw_path[3] if len(raw_path) == 4 else ""), query=query,
            body=await self._read_body(receive),
            headers=[(k.decode("latin-1"), v.decode("latin-1"))
                     for k, v in scope["headers"] if k not in _NOT_STORED],
            priority=_priority(headers.get(b"x-fal-queue-priority")),
            hint=hint.decode("latin-1") if hint else None, deadline=deadline,
            no_retry=headers.get(b"x-fal-no-retry", b"").strip() in (b"1", b"true"),
            webhook=webhook,
        )  # fmt: skip
        await self._commits.add(request)
        self._dispatcher.wake(owner, name)
        body = {**_urls(scope, request), "request_id": request.id, "status": "IN_QUEUE"}
        await _send_json(send, 200, body, request.id)

    async def _read_body(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                raise _too_large(self._max_body)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    # -- status, result, cancel ---------------------------------------------------------

    def _status(self, scope: Scope, request: QueuedRequest) -> dict[str, Any]:
        query = dict(parse_qsl((scope.get("query_string") or b"").decode("latin-1")))
        with_logs = query.get("logs", "").lower() in ("1", "true", "yes")
        data: dict[str, Any] = {"status": request.state.wire, "request_id": request.id,
                                **_urls(scope, request)}  # fmt: skip
        data["logs"] = self._request_logs(request) if with_logs else None
        if request.state in (RowState.QUEUED, RowState.CLAIMED):
            data["queue_position"] = self._store.position(request)
        result = request.result
        if request.state == RowState.DONE and result is not None:
            started = request.started_at or request.finished_at or 0.0
            data["metrics"] = {"inference_time": max(0.0, (request.finished_at or 0.0) - started)}
            if not result.ok:
                data["error"], data["error_type"] = result.error, result.error_type
        return data

    def _request_logs(self, request: QueuedRequest) -> list[dict[str, Any]]:
        late = self._late_window(request)
        return [
            {"message": r.message, "level": r.level, "source": r.source,
             "timestamp": datetime.fromtimestamp(r.timestamp, UTC).isoformat()}
            for r in self._logs.recent(request.owner, request.app, limit=100_000)
            if r.request_id == request.id or (
                late is not None and r.request_id is None and r.runner_id == late[0]
                and r.source == "runner" and late[1] <= r.timestamp <= late[2])
        ]  # fmt: skip

    def _late_window(self, request: QueuedRequest) -> tuple[str, float, float] | None:
        """The runner and time span whose untagged lines still belong to a finished request.

        The fleet tags a runner's output with the request it serves, but the output pipe and
        the HTTP answer race: a line printed just before returning may be read after the
        slot was released, untagged. On a runner that serves one request at a time, such a
        line, read within a moment of the result, is the request's own."""
        if request.state != RowState.DONE or not request.runner_id or not request.finished_at:
            return None
        resolved = self._apps.resolve(request.owner, request.app)
        options = resolved[1].manifest.get("options", {}) if resolved and resolved[1] else {}
        if int(options.get("max_multiplexing") or 1) != 1:
            return None
        return request.runner_id, request.finished_at - 0.05, request.finished_at + _LATE_LOGS

    async def _result(self, scope: Scope, send: Send, request: QueuedRequest) -> None:
        result = request.result
        if request.state != RowState.DONE or result is None:
            await _send_json(send, 202, self._status(scope, request), request.id)
            return
        headers = [(b"content-type", result.content_type.encode("latin-1")),
                   (b"content-length", str(len(result.body)).encode()),
                   (b"x-fal-request-id", request.id.encode())]  # fmt: skip
        if result.error_type and not result.ok:
            headers.append((b"x-fal-error-type", result.error_type.encode("latin-1")))
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in result.headers]
        await send({"type": "http.response.start", "status": result.status, "headers": headers})
        await send({"type": "http.response.body", "body": result.body})

    async def _cancel(self, send: Send, request: QueuedRequest) -> None:
        outcome = self._dispatcher.cancel(request.id)
        if outcome == CancelOutcome.ALREADY_COMPLETED:
            body = {"status": str(outcome), "detail": f"request {request.id} already finished",
                    "error_type": "already_completed"}  # fmt: skip
            await _send_json(send, 400, body, request.id)
        else:
            await _send_json(send, 202, {"status": str(outcome)}, request.id)

    async def _stream(
        self, scope: Scope, receive: Receive, send: Send, request: QueuedRequest
    ) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
            (b"x-fal-request-id", request.id.encode())]})  # fmt: skip
        event = self._dispatcher.watch(request.id)
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await self._stream_until_done(scope, send, request, event, gone)
        finally:
            self._dispatcher.unwatch(request.id, event)
            gone.cancel()
        await send({"type": "http.response.body", "body": b""})

    async def _stream_until_done(
        self, scope: Scope, send: Send, request: QueuedRequest, event: asyncio.Event,
        gone: asyncio.Future[None],
    ) -> None:  # fmt: skip
        last = b""
        while not gone.done():
            event.clear()
            current = self._store.get(request.id) or request
            line = b"data: " + json.dumps(self._status(scope, current)).encode() + b"\n\n"
            if line != last:
                await send({"type": "http.response.body", "body": line, "more_body": True})
                last = line
            if current.state == RowState.DONE:
                return
            waiter = asyncio.ensure_future(event.wait())
            await asyncio.wait((waiter, gone), timeout=_STREAM_POLL,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            waiter.cancel()

    # -- lookups ------------------------------------------------------------------------

    def _lookup(self, owner: str, name: str) -> AppRecord:
        resolved = self._apps.resolve(owner, name)
        if resolved is None or resolved[1] is None:
            raise Refused(404, f"App '{owner}/{name}' not found or has no deployed revision: "
                          "deploy it with `fal deploy`, or check the owner and app name in the "
                          "URL", "app_not_found")  # fmt: skip
        app: AppRecord = resolved[0]
        return app

    def _authorize(self, app: AppRecord, headers: dict[bytes, bytes]) -> None:
        if app.auth == "public":
            return
        auth = headers.get(b"authorization")
        ok, status, reason = self._keys.authorize(app, auth.decode("latin-1") if auth else None)
        if not ok:
            raise Refused(status, reason, "unauthorized" if status == 401 else "forbidden")

    def _load(self, scope: Scope, owner: str, name: str, request_id: str) -> QueuedRequest:
        request = self._store.get(request_id)
        if request is None or (request.owner, request.app) != (owner, name):
            raise Refused(404, f"request {request_id!r} of {owner}/{name} not found: use the "
                          "request_id the submit answered with", "request_not_found")  # fmt: skip
        resolved = self._apps.resolve(owner, name)
        # An app deleted since: only its owner's (or an admin) key may read what is left.
        app = resolved[0] if resolved else AppRecord(owner, name, "private", False, None)
        self._authorize(app, dict(scope["headers"]))
        return request


class _GroupCommit:
    """Submits that arrive together share one transaction; each answers only once the
    commit holding its row is done (a commit costs about as much for 1 row as for 20)."""

    def __init__(self, store: QueueStore) -> None:
        self._store = store
        self._batch: list[tuple[QueuedRequest, asyncio.Future[None]]] = []

    async def add(self, request: QueuedRequest) -> None:
        loop = asyncio.get_running_loop()
        if not self._batch:
            loop.call_soon(self._flush)  # after the submits already ready to run
        done = loop.create_future()
        self._batch.append((request, done))
        await done

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        try:
            self._store.add_many([request for request, _ in batch])
        except Exception as exc:  # every submit of the batch fails alike, none is lost quietly
            error = Refused(503, f"the queue database refused the submit ({exc}): retry, and "
                            "check the service's disk and log", "internal_error")  # fmt: skip
            for _, done in batch:
                if not done.done():
                    done.set_exception(error)
            return
        for _, done in batch:
            if not done.done():
                done.set_result(None)


class _DepthGauge:
    """The per-app cap on unfinished requests, cheap on the submit path: one COUNT per app
    at most every half second, plus the submits admitted since. Requests finished since
    the count still count until the next one: the cap errs on the side of refusing."""

    def __init__(self, store: QueueStore, limit: int) -> None:
        self._store, self._limit = store, limit
        self._seen: dict[tuple[str, str], tuple[int, float]] = {}  # app -> (count, at)

    def admit(self, owner: str, app: str) -> None:
        if self._limit <= 0:
            return
        now = time.monotonic()
        count, at = self._seen.get((owner, app), (0, -math.inf))
        if now - at > _DEPTH_RECOUNT:
            count, at = self._store.count(owner, app, _OPEN), now
        if count >= self._limit:
            self._seen[(owner, app)] = (count, at)
            raise Refused(429, f"the queue of {owner}/{app} holds {count} unfinished requests, "
                          f"its cap (--max-queue-depth {self._limit}): retry later, or raise "
                          "max_concurrency so it drains faster", "queue_full",
                          ((b"retry-after", b"1"),))  # fmt: skip
        self._seen[(owner, app)] = (count + 1, at)


def _too_large(limit: int) -> Refused:
    return Refused(413, f"request body over {limit} bytes: send large inputs as URLs, or ask "
                   "the operator to raise --max-body-bytes", "payload_too_large")  # fmt: skip


def _urls(scope: Scope, request: QueuedRequest) -> dict[str, str]:
    """Absolute URLs from the request's own scheme and Host, so a client reaches us as it did."""
    host = dict(scope["headers"]).get(b"host")
    if host is None:
        server = scope.get("server") or ("127.0.0.1", 80)
        host = f"{server[0]}:{server[1]}".encode()
    root = f"{scope.get('scheme', 'http')}://{host.decode('latin-1')}{scope.get('root_path', '')}"
    base = f"{root}{PREFIX}/{request.owner}/{request.app}/requests/{request.id}"
    return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}


def _split_query(raw: bytes) -> tuple[str, str | None]:
    """The query without ``fal_webhook`` (for the runner), and the webhook URL."""
    pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    hooks = [v for k, v in pairs if k == "fal_webhook"]
    if hooks and not hooks[-1].startswith(("http://", "https://")):
        raise Refused(400, f"fal_webhook = {hooks[-1]!r}: expected an http(s) URL, e.g. "
                      "?fal_webhook=https://example.com/hook", "invalid_request")  # fmt: skip
    if not hooks:
        return raw.decode("latin-1"), None
    return urlencode([(k, v) for k, v in pairs if k != "fal_webhook"]), hooks[-1]


def _priority(raw: bytes | None) -> int:
    value = (raw or b"normal").decode("latin-1").strip().lower()
    if value not in _PRIORITIES:
        raise Refused(400, f"X-Fal-Queue-Priority = {value!r}: expected 'normal' or 'low', "
                      "e.g. X-Fal-Queue-Priority: low", "invalid_request")  # fmt: skip
    return _PRIORITIES[value]


def _deadline(raw: bytes | None) -> float | None:
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise Refused(400, f"X-Fal-Request-Timeout = {raw.decode('latin-1')!r}: expected a "
                      "number of seconds > 0, e.g. X-Fal-Request-Timeout: 30",
                      "invalid_request")  # fmt: skip
    return time.time() + seconds


async def _send_json(send: Send, status: int, data: Any, request_id: str) -> None:
    body = json.dumps(data).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        _JSON, (b"content-length", str(len(body)).encode()),
        (b"x-fal-request-id", request_id.encode("latin-1"))]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


async def _disconnected(receive: Receive) -> None:
    with contextlib.suppress(Exception):
        while (await receive())["type"] != "http.disconnect":
            pass
