"""One attempt of a queued request: send it to a runner, read the whole answer.

Uses the gateway's upstream aiohttp session and its header rules
(``gateway._wire.upstream_request_headers``), so a runner cannot tell a queued call from a
sync one except by the path it came through. Unlike the sync proxy nothing is streamed: the
queue stores the answer, so the body is read in full. Errors become fal-shaped results
(``{"detail": ..., "error_type": ...}``) so the result endpoint can replay them as stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import aiohttp
from yarl import URL

from buildsvc.gateway._wire import upstream_request_headers
from buildsvc.queue.retry import Attempt, Failure, classify
from buildsvc.queue.store import QueuedRequest, Result

__all__ = ["Answer", "call_runner", "error_result"]

_DETAIL_CHARS = 4000  # of a non-JSON error body, kept as the error's detail


@dataclass(frozen=True)
class Answer:
    attempt: Attempt  # what the retry decision needs
    result: Result | None  # the runner's answer as stored; None when there was no answer


def error_result(
    status: int, detail: str, error_type: str, headers: tuple[tuple[str, str], ...] = ()
) -> Result:
    """A terminal error the queue itself decided on (cancel, timeout, retries spent)."""
    body = json.dumps({"detail": detail, "error_type": error_type}).encode()
    return Result(status, body, "application/json", detail, error_type, headers)


async def call_runner(
    session: aiohttp.ClientSession,
    runner_url: str,
    request: QueuedRequest,
    timeout: aiohttp.ClientTimeout,
) -> Answer:
    """POST ``request`` to the runner at ``runner_url``; never raises for runner failures."""
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers]
    url = URL(runner_url + request.path + (f"?{request.query}" if request.query else ""),
              encoded=True)  # fmt: skip
    try:
        async with session.post(
            url, data=request.body or None, allow_redirects=False, timeout=timeout,
            headers=upstream_request_headers(raw, request.id, request.path),
        ) as resp:  # fmt: skip
            body = await resp.read()
            return _answer(resp, body)
    except aiohttp.ClientConnectorError:
        return Answer(Attempt(failure=Failure.CONNECT), None)
    except TimeoutError:
        return Answer(Attempt(failure=Failure.TIMEOUT), None)
    except aiohttp.ClientError:
        return Answer(Attempt(failure=Failure.DISCONNECT), None)


def _answer(resp: aiohttp.ClientResponse, body: bytes) -> Answer:
    needs = resp.headers.get("x-fal-needs-retry")
    attempt = Attempt(status=resp.status, needs_retry=needs.strip() if needs else None)
    content_type = resp.headers.get("content-type", "application/json")
    if resp.status < 400:
        return Answer(attempt, Result(resp.status, body, content_type))
    _, default_type = classify(attempt)
    error_type = resp.headers.get("x-fal-error-type") or default_type or "http_error"
    return Answer(attempt, _error_answer(resp.status, body, error_type))


def _error_answer(status: int, body: bytes, error_type: str) -> Result:
    """The runner's error body with ``error_type`` added; a non-JSON body becomes a detail."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error_type = str(data.get("error_type") or error_type)
        detail = data.get("detail")
        data["error_type"] = error_type
        text = detail if isinstance(detail, str) else json.dumps(detail)
        return Result(status, json.dumps(data).encode(), "application/json", text, error_type)
    text = body.decode("utf-8", "replace")[:_DETAIL_CHARS] or f"status {status}"
    return error_result(status, text, error_type)
