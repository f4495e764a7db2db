"""The gateway: ``/{owner}/{app}[/{path}]`` -> a runner of that app, streamed both ways.

A raw ASGI callable (no framework on this path: it is the hot one). Per request it does one
in-memory app lookup (``Store.resolve``, cached by the store), the auth check, a fleet
``acquire`` (a warm slot, or a cold start), and relays the request over one shared aiohttp
session with keep-alive connections to the runners. Bodies stream in both directions and
nothing is buffered, so each server-sent event reaches the caller as the runner yields it.

Behaviour follows /work/shared/reference/wire-protocol.md: ``x-fal-request-id`` on every
response, ``x-fal-endpoint`` to the runner, ``X-Fal-Runner-Hint(s)``, 504 with
``X-Fal-Request-Timeout-Type: user`` when no runner frees up in ``X-Fal-Request-Timeout``
seconds, 503 ``startup_error`` with the app's traceback when its cold start fails, 503
``runner_disconnected`` when a runner drops the connection (sync calls are never retried).
Websockets are relayed by ``gateway.websocket``.

Limits at the door (the queue applies the same ones to submits): a body over
``max_body_bytes`` is 413 ``payload_too_large``; with ``rate_limit`` on, a caller (its key,
else its address) over its token bucket gets 429 ``rate_limited`` with ``Retry-After``. A
runner answering 500 or 502 gets one health probe (``Fleet.probe``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from buildsvc.fleet import AppStopped, Fleet, Lease, NoRunnerAvailable
from buildsvc.gateway import websocket
from buildsvc.gateway._wire import (
    HOP_BY_HOP,
    Receive,
    Refused,
    Scope,
    Send,
    request_id,
    send_error,
    upstream_request_headers,
)
from buildsvc.logs import LogHub, LogRecord
from buildsvc.records import AppRecord, RevisionRecord
from buildsvc.runtime.base import RunnerStartError

__all__ = ["Gateway", "Target"]

_TRACEBACK_TAIL = 4000  # characters of an app's startup traceback shown to the caller
_CONNECT_TIMEOUT = 10.0
_DROP_FROM_RUNNER = HOP_BY_HOP | {b"x-fal-request-id"}
_MAX_BODY = 64 * 1024**2  # without a config saying otherwise
_PROBED = (500, 502)  # answers after which the runner's health is checked once
_BUCKETS_KEPT = 10_000  # callers remembered before full buckets are forgotten


class _RateLimiter:
    """A token bucket per caller: ``rate`` requests per second, bursts of ``burst``.

    ``wait(caller)`` takes a token and returns 0, or returns the seconds until one is due
    (the caller is refused: 429 with that Retry-After). ``rate`` 0 turns it off."""

    def __init__(self, rate: float, burst: int, clock: Any = time.monotonic) -> None:
        self.rate, self.burst, self._clock = float(rate), max(1, int(burst)), clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at)

    def wait(self, caller: str) -> float:
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        tokens, at = self._buckets.get(caller, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if len(self._buckets) >= _BUCKETS_KEPT:
            self._forget_full(now)
        if tokens >= 1.0:
            self._buckets[caller] = (tokens - 1.0, now)
            return 0.0
        self._buckets[caller] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        """A bucket refilled to the brim is the same as no bucket: drop those."""
        full = [c for c, (t, at) in self._buckets.items()
                if t + (now - at) * self.rate >= self.burst]  # fmt: skip
        for caller in full:
            del self._buckets[caller]


def _rate_refusal(limiter: _RateLimiter, keys: Any, scope: Scope, auth: bytes | None) -> None:
    """Raise 429 when the caller is over its rate: the caller is the key it proved, else
    its address (an unproven key id must not spend someone else's bucket)."""
    if limiter.rate <= 0:
        return
    key = keys.authenticate(auth.decode("latin-1")) if auth else None
    client = scope.get("client")
    caller = f"key:{key.key_id}" if key is not None else f"addr:{client[0] if client else '?'}"
    wait = limiter.wait(caller)
    if wait > 0:
        seconds = max(1, int(wait + 0.999))
        raise Refused(429, f"rate limit of {limiter.rate:g} requests/s (bursts of "
                      f"{limiter.burst}) reached for this key: retry in {seconds}s, or ask the "
                      "operator to raise --rate-limit", "rate_limited",
                      ((b"retry-after", str(seconds).encode()),))  # fmt: skip


def _body_refusal(limit: int, size: int | None = None) -> Refused:
    shown = f" ({size} bytes)" if size is not None else ""
    detail = (f"request body over {limit} bytes{shown}: send large inputs as URLs, or ask "
              "the operator to raise --max-body-bytes")  # fmt: skip
    return Refused(413, detail, "payload_too_large")


@dataclass
class Target:
    """What a request resolved to: the app, its revision and the runner slot it holds."""

    app: AppRecord
    revision: RevisionRecord
    lease: Lease
    path: str  # the endpoint path, "/" + rest
    raw_rest: bytes  # the same, still percent-encoded, without the leading "/"


class Gateway:
    """ASGI app serving every app's endpoints; see the module docstring."""

    def __init__(self, *, store: Any, fleet: Fleet, keys: Any, logs: LogHub, config: Any) -> None:
        self._store, self._fleet, self._keys, self._logs = store, fleet, keys, logs
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self.max_body = int(getattr(config, "max_body_bytes", _MAX_BODY))
        self._limiter = _RateLimiter(float(getattr(config, "rate_limit", 0.0)),
                                     int(getattr(config, "rate_burst", 50)))  # fmt: skip

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def check_rate(self, scope: Scope, headers: dict[bytes, bytes]) -> None:
        """Raise Refused(429) when the caller is over ``rate_limit`` (the queue's submits
        share the buckets: one caller, one budget)."""
        _rate_refusal(self._limiter, self._keys, scope, headers.get(b"authorization"))

    def session(self) -> aiohttp.ClientSession:
        """The one upstream session (created lazily: it must live on the serving loop)."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0)
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,  # relay bytes as the runner encoded them
                # A shared jar would replay one caller's cookies to the next: never keep any.
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=_CONNECT_TIMEOUT),
            )
        return self._session

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await websocket.relay(self, scope, receive, send)

    # -- shared by HTTP and websockets --------------------------------------------------

    async def resolve(self, scope: Scope, request_id: str, headers: dict[bytes, bytes]) -> Target:
        """Find the app, check the caller may use it, and hold a runner slot for it."""
        owner, name, rest = _split(scope)
        app, revision = self._lookup(owner, name)
        if app.auth != "public":
            auth = headers.get(b"authorization")
            ok, status, reason = self._keys.authorize(app, auth.decode("latin-1") if auth else None)
            if not ok:
                raise Refused(status, reason, "unauthorized" if status == 401 else "forbidden")
        self.check_rate(scope, headers)
        lease = await self._acquire(app, revision, headers, request_id)
        raw_path = scope.get("raw_path") or scope["path"].encode()
        raw_rest = raw_path.split(b"/", 3)[3] if raw_path.count(b"/") >= 3 else b""
        return Target(app, revision, lease, "/" + rest, raw_rest)

    def _lookup(self, owner: str, name: str) -> tuple[AppRecord, RevisionRecord]:
        resolved = self._store.resolve(owner, name)
        if resolved is None:
            raise Refused(
                404,
                f"App '{owner}/{name}' not found: deploy it with `fal deploy`, or check the "
                "owner and app name in the URL",
                "app_not_found",
            )
        app, revision = resolved
        if revision is None:
            raise Refused(
                404, f"App '{owner}/{name}' has no deployed revision: run `fal deploy`",
                "app_not_found",
            )  # fmt: skip
        return app, revision

    async def _acquire(
        self, app: AppRecord, revision: RevisionRecord, headers: dict[bytes, bytes], rid: str
    ) -> Lease:
        timeout = _request_timeout(headers.get(b"x-fal-request-timeout"))
        hint = headers.get(b"x-fal-runner-hint")
        try:
            return await self._fleet.acquire(
                app, revision, hint=hint.decode("latin-1") if hint else None,
                timeout=timeout, request_id=rid,
            )  # fmt: skip
        except NoRunnerAvailable as exc:
            raise Refused(504, str(exc), "request_timeout",
                           ((b"x-fal-request-timeout-type", b"user"),)) from None  # fmt: skip
        except RunnerStartError as exc:
            tail = exc.detail[-_TRACEBACK_TAIL:] if exc.detail else ""
            detail = f"App '{app.owner}/{app.name}' failed to start: {exc.reason}"
            self._log(app, rid, "ERROR", detail)
            raise Refused(503, detail + (f"\n{tail}" if tail else ""), "startup_error") from None
        except AppStopped as exc:
            raise Refused(404, f"{exc}: deploy it again", "app_not_found") from None

    def request_timeout(self, revision: RevisionRecord) -> aiohttp.ClientTimeout:
        """The upstream timeout for one call: the app's ``request_timeout`` option."""
        seconds = float(revision.manifest.get("options", {}).get("request_timeout") or 0)
        found = self._timeouts.get(seconds)
        if found is None:
            found = self._timeouts[seconds] = aiohttp.ClientTimeout(
                total=seconds or None, sock_connect=_CONNECT_TIMEOUT
            )
        return found

    def _log(self, app: AppRecord, request_id: str | None, level: str, message: str) -> None:
        self._logs.emit(LogRecord(
            timestamp=time.time(), level=level, source="gateway", owner=app.owner, app=app.name,
            runner_id=None, request_id=request_id, message=message,
        ))  # fmt: skip

    # -- HTTP ---------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        rid = request_id(headers)
        try:
            _check_length(headers.get(b"content-length"), self.max_body)
            target = await self.resolve(scope, rid, headers)
        except Refused as exc:
            await send_error(send, exc.status, exc.detail, exc.error_type, rid, exc.headers)
            return
        broken = True
        try:
            broken = await self._forward(scope, receive, send, target, rid)
        finally:
            await target.lease.release(broken=broken)

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, target: Target, rid: str
    ) -> bool:
        """Relay one request; return True when the runner must be replaced."""
        runner = target.lease.runner
        query = scope.get("query_string") or b""
        url = URL(f"{runner.url}/{target.raw_rest.decode('latin-1')}"
                  + (f"?{query.decode('latin-1')}" if query else ""), encoded=True)  # fmt: skip
        body = _RequestBody(receive, self.max_body)
        try:
            resp = await self.session().request(
                scope["method"], url,
                headers=upstream_request_headers(scope["headers"], rid, target.path),
                data=await body.payload(), allow_redirects=False,
                timeout=self.request_timeout(target.revision),
            )  # fmt: skip
        except (aiohttp.ClientError, TimeoutError) as exc:
            if body.too_large:  # a streamed body went over the cap: the runner is fine
                refusal = _body_refusal(self.max_body)
                await send_error(send, 413, refusal.detail, refusal.error_type, rid)
                return False
            return await self._upstream_failed(send, target, rid, exc)
        async with resp:
            return await self._relay(resp, send, target, rid, body)

    async def _upstream_failed(
        self, send: Send, target: Target, rid: str, exc: BaseException
    ) -> bool:
        runner = target.lease.runner
        if isinstance(exc, TimeoutError):
            detail = (f"runner {runner.id} did not answer within request_timeout: raise "
                      "request_timeout or make the endpoint faster")  # fmt: skip
            error_type, status = "request_timeout", 504
        else:
            detail = (f"lost the connection to runner {runner.id} ({type(exc).__name__}); "
                      "it is being replaced: send the request again")  # fmt: skip
            error_type, status = "runner_disconnected", 503
        self._log(target.app, rid, "WARNING", detail)
        await send_error(send, status, detail, error_type, rid)
        return True

    async def _relay(
        self,
        resp: aiohttp.ClientResponse,
        send: Send,
        target: Target,
        rid: str,
        body: _RequestBody,
    ) -> bool:
        headers = [(b"x-fal-request-id", rid.encode("latin-1"))]
        events = False
        for name, value in resp.raw_headers:
            lower = name.lower()
            if lower in _DROP_FROM_RUNNER:
                continue
            if lower == b"x-fal-runner-hints":
                self._fleet.remember_hints(target.lease.runner.id, value.decode("latin-1"))
            elif lower == b"content-type":
                events = value.startswith(b"text/event-stream")
            headers.append((lower, value))
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        try:
            if events and body.done:  # an open-ended stream: stop when the caller goes away
                await _pump_until_disconnect(resp, send, body.receive)
            else:
                await _pump(resp, send)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Headers are out: end without completing the body, so the caller sees a cut.
            what = f"runner {target.lease.runner.id} broke off its response: {exc!r}"
            self._log(target.app, rid, "WARNING", what)
            return True
        if resp.status in _PROBED and not _exposed(target.revision):
            self._fleet.probe(target.lease.runner.id)
        # The protocol's "this runner is broken"; a direct server's 503 (exposed_port, every
        # path forwarded as is) is its own answer, not our runner agent's.
        return resp.status == 503 and not _exposed(target.revision)


class _RequestBody:
    """The caller's body as an aiohttp payload: bytes when it came in one piece (the usual
    case, sent with a Content-Length), else a stream of its chunks."""

    def __init__(self, receive: Receive, limit: int = _MAX_BODY) -> None:
        self.receive = receive
        self.done = False
        self.limit, self.size, self.too_large = limit, 0, False

    def _count(self, chunk: bytes) -> bytes:
        self.size += len(chunk)
        if self.size > self.limit:
            self.too_large = True
            raise aiohttp.ClientPayloadError(f"the request body went over {self.limit} bytes")
        return chunk

    async def payload(self) -> Any:
        message = await self.receive()
        chunk = message.get("body", b"")
        if not message.get("more_body", False):
            self.done = True
            if len(chunk) > self.limit:  # a Content-Length that lied
                self.too_large = True
                raise aiohttp.ClientPayloadError(f"the body went over {self.limit} bytes")
            return chunk or None
        return self._rest(chunk)

    async def _rest(self, first: bytes) -> Any:
        yield self._count(first)
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise aiohttp.ClientPayloadError("the caller disconnected mid-body")
            yield self._count(message.get("body", b""))
            if not message.get("more_body", False):
                self.done = True
                return


async def _pump(resp: aiohttp.ClientResponse, send: Send) -> None:
    content = resp.content
    while True:
        chunk = await content.readany()
        if not chunk:
            await send({"type": "http.response.body", "body": b""})
            return
        last = content.at_eof()
        await send({"type": "http.response.body", "body": chunk, "more_body": not last})
        if last:
            return


async def _pump_until_disconnect(
    resp: aiohttp.ClientResponse, send: Send, receive: Receive
) -> None:
    pump = asyncio.ensure_future(_pump(resp, send))
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((pump, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pump, watch):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
    if not pump.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            await pump  # re-raises a broken stream for the caller above


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _check_length(raw: bytes | None, limit: int) -> None:
    """Refuse a declared body over the cap before any work (a runner slot, a cold start)."""
    if raw is not None and raw.strip().isdigit() and int(raw) > limit:
        raise _body_refusal(limit, int(raw))


def _exposed(revision: RevisionRecord) -> bool:
    return revision.manifest.get("options", {}).get("exposed_port") is not None


def _split(scope: Scope) -> tuple[str, str, str]:
    parts = scope["path"].split("/", 3)
    if len(parts) < 3 or not parts[1] or not parts[2]:
        raise Refused(
            404,
            f"Path {scope['path']!r} not found: app endpoints live at /{{owner}}/{{app}}[/path], "
            "e.g. POST /alice/my-app",
            "app_not_found",
        )
    return parts[1], parts[2], parts[3] if len(parts) == 4 else ""


def _request_timeout(raw: bytes | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise Refused(
            400,
            f"X-Fal-Request-Timeout = {raw.decode('latin-1')!r}: expected a number of seconds "
            "> 0, e.g. X-Fal-Request-Timeout: 30",
            "invalid_request",
        )
    return value
