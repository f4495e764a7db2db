"""Wire details shared by the HTTP and websocket proxies: header filtering and error replies.

Errors follow fal's shape: JSON ``{"detail": ..., "error_type": ...}`` with the same kind in
the ``x-fal-error-type`` header, and ``x-fal-request-id`` on every response.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

__all__ = [
    "HOP_BY_HOP",
    "Receive",
    "Refused",
    "Scope",
    "Send",
    "error_body",
    "error_headers",
    "request_id",
    "send_error",
    "upstream_request_headers",
]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# RFC 9110 7.6.1 hop-by-hop headers, plus what the proxy itself owns or must not pass on.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})  # fmt: skip
# Not forwarded to the runner: the caller's credentials are never the app's business (a
# public app would otherwise read its callers' keys), and the ids the gateway sets itself.
_NOT_TO_RUNNER = HOP_BY_HOP | {
    b"host", b"authorization", b"x-fal-request-id", b"x-fal-endpoint",
    b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
    b"sec-websocket-protocol",
}  # fmt: skip


class Refused(Exception):
    """A request the gateway answers itself, with a fal-shaped error."""

    def __init__(
        self,
        status: int,
        detail: str,
        error_type: str,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(detail)
        self.status, self.detail, self.error_type, self.headers = (
            status, detail, error_type, headers,
        )  # fmt: skip


def request_id(headers: dict[bytes, bytes]) -> str:
    """The caller's ``x-fal-request-id`` if it sent a sane one, else 128 random bits in hex
    (``os.urandom``: a fifth of ``uuid.uuid4()``'s cost on this hot path)."""
    given = headers.get(b"x-fal-request-id")
    if given and len(given) <= 128 and given.isascii():
        return given.decode("ascii")
    return os.urandom(16).hex()


def upstream_request_headers(
    headers: Iterable[tuple[bytes, bytes]], request_id: str, endpoint: str
) -> list[tuple[str, str]]:
    """The caller's headers as the runner should see them."""
    out = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in headers
        if name not in _NOT_TO_RUNNER
    ]
    out.append(("x-fal-request-id", request_id))
    out.append(("x-fal-endpoint", endpoint))
    return out


def error_body(detail: str, error_type: str) -> bytes:
    return json.dumps({"detail": detail, "error_type": error_type}).encode()


def error_headers(
    body: bytes, error_type: str, request_id: str, extra: Iterable[tuple[bytes, bytes]] = ()
) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-fal-error-type", error_type.encode()),
        (b"x-fal-request-id", request_id.encode("latin-1")),
        *extra,
    ]


async def send_error(
    send: Send,
    status: int,
    detail: str,
    error_type: str,
    request_id: str,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Answer an HTTP request with a fal-shaped JSON error."""
    body = error_body(detail, error_type)
    headers = error_headers(body, error_type, request_id, extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
