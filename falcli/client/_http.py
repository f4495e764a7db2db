"""The HTTP session under every resource: auth header, timeouts, and the error mapping.

Every failure leaves here as a ``falcli.errors.ClientError``:

    connection refused / transport error -> ServiceUnavailable
    401 / 403                             -> AuthError (with the server's reason)
    404                                   -> NotFoundError
    5xx                                   -> ServerError
    other 4xx                             -> ClientError
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from falcli import __version__
from falcli.errors import AuthError, ClientError, NotFoundError, ServerError, ServiceUnavailable

__all__ = ["Session", "iter_ndjson"]

_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
# Streams (deploy, follow logs) stay open as long as a build or a log tail does.
_STREAM_TIMEOUT = httpx.Timeout(30.0, connect=5.0, read=None)


class Session:
    """A thin wrapper of ``httpx.Client`` bound to one service and one key."""

    def __init__(
        self, base_url: str, key: str | None, *, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"User-Agent": f"falcli/{__version__}"}
        if key:
            headers["Authorization"] = f"Key {key}"
        # A plain-http service needs no TLS: skip loading the CA bundle (~180 ms per process).
        verify = not self.base_url.startswith("http://")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=_TIMEOUT,
            transport=transport,
            verify=verify,
        )

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        content: Iterable[bytes] | bytes | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        """Send one request and return its decoded JSON body (None when empty)."""
        try:
            resp = self._http.request(
                method, path, json=json_body, content=content, headers=headers, params=params
            )
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        _raise_for_status(resp, self.base_url)
        return resp.json() if resp.content else None

    @contextmanager
    def stream(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, str] | None = None,
    ) -> Iterator[httpx.Response]:
        """An open streaming response whose status was already checked."""
        try:
            with self._http.stream(
                method, path, json=json_body, params=params, timeout=_STREAM_TIMEOUT
            ) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _raise_for_status(resp, self.base_url)
                yield resp
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: httpx.TransportError) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"cannot reach the service at {self.base_url} ({type(exc).__name__}: {exc}): "
            "check that it runs (`fal server status`), or point --server / FAL_SERVER_URL "
            "at a running one"
        )


def iter_ndjson(resp: httpx.Response) -> Iterator[dict[str, Any]]:
    """Decode a newline-delimited JSON stream, one object per non-empty line."""
    for line in resp.iter_lines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ServerError(
                f"the service sent a line that is not JSON in an NDJSON stream: {line[:200]!r}; "
                "this is a service bug, report it with the service log"
            ) from exc
        if isinstance(obj, dict):
            yield obj


def _error_body(resp: httpx.Response) -> tuple[str, str]:
    """(detail, error_type) of a contract-2 error body, tolerant of other shapes."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:500] or resp.reason_phrase, ""
    if not isinstance(body, dict):
        return str(body)[:500], ""
    detail = body.get("detail", "")
    if not isinstance(detail, str):
        detail = json.dumps(detail)[:500]  # FastAPI validation errors are lists
    return detail or resp.reason_phrase, str(body.get("error_type", ""))


def _raise_for_status(resp: httpx.Response, base_url: str) -> None:
    status = resp.status_code
    if status < 400:
        return
    detail, error_type = _error_body(resp)
    what = f"{resp.request.method} {resp.request.url.path}"
    if status in (401, 403):
        raise AuthError(
            f"{base_url} refused the key for {what} ({status}: {detail}): set FAL_KEY to a "
            "valid key for this service (`fal keys create` with an admin key makes one)",
            status=status,
            error_type=error_type,
        )
    if status == 404:
        raise NotFoundError(f"{what}: {detail}", status=status, error_type=error_type)
    if status >= 500:
        raise ServerError(
            f"the service failed on {what} ({status}): {detail}",
            status=status,
            error_type=error_type,
            detail=detail,
        )
    raise ClientError(
        f"{what} was rejected ({status}): {detail}", status=status, error_type=error_type
    )
