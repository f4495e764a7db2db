"""Websocket relay: caller <-> gateway (ASGI) <-> runner (aiohttp client), both directions.

The caller's handshake is checked like any request (app, auth, a runner slot, held for the
socket's whole life). The runner's handshake happens before the caller's is accepted, so a
runner that refuses (or is gone) turns into an HTTP error for the caller when the server
supports ASGI's websocket denial response, and a close frame otherwise. Close codes are
passed through in both directions.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import aiohttp
from yarl import URL

from buildsvc.gateway._wire import (
    Receive,
    Refused,
    Scope,
    Send,
    error_body,
    error_headers,
    request_id,
    upstream_request_headers,
)

if TYPE_CHECKING:
    from buildsvc.gateway.proxy import Gateway, Target

__all__ = ["relay"]

_POLICY_VIOLATION = 1008
_INTERNAL_ERROR = 1011


async def relay(gateway: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    """Serve one websocket connection for the gateway."""
    if (await receive())["type"] != "websocket.connect":
        return
    headers = dict(scope["headers"])
    rid = request_id(headers)
    try:
        target = await gateway.resolve(scope, rid, headers)
    except Refused as exc:
        await _deny(scope, send, exc.status, exc.detail, exc.error_type, rid)
        return
    broken = True
    try:
        broken = await _bridge(gateway, scope, receive, send, target, rid)
    finally:
        await target.lease.release(broken=broken)


async def _bridge(
    gateway: Gateway, scope: Scope, receive: Receive, send: Send, target: Target, rid: str
) -> bool:
    """Connect to the runner, accept the caller, pump until either side closes."""
    runner = target.lease.runner
    query = (scope.get("query_string") or b"").decode("latin-1")
    base = str(runner.url).replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    url = URL(f"{base}/{target.raw_rest.decode('latin-1')}" + (f"?{query}" if query else ""),
              encoded=True)  # fmt: skip
    try:
        upstream = await gateway.session().ws_connect(
            url, headers=upstream_request_headers(scope["headers"], rid, target.path),
            protocols=tuple(scope.get("subprotocols") or ()), max_msg_size=0,
        )  # fmt: skip
    except aiohttp.WSServerHandshakeError as exc:
        detail = f"the runner refused the websocket on {target.path}: {exc.status} {exc.message}"
        await _deny(scope, send, exc.status, detail, "websocket_refused", rid)
        return exc.status == 503
    except (aiohttp.ClientError, TimeoutError) as exc:
        detail = f"lost the connection to runner {runner.id} ({type(exc).__name__})"
        await _deny(scope, send, 503, detail, "runner_disconnected", rid)
        return True
    async with upstream:
        await send({
            "type": "websocket.accept", "subprotocol": upstream.protocol,
            "headers": [(b"x-fal-request-id", rid.encode("latin-1"))],
        })  # fmt: skip
        await _pump_both(receive, send, upstream)
    return False


async def _pump_both(
    receive: Receive, send: Send, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    tasks = (
        asyncio.ensure_future(_caller_to_runner(receive, upstream)),
        asyncio.ensure_future(_runner_to_caller(upstream, send)),
    )
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError, OSError):
                await task


async def _caller_to_runner(receive: Receive, upstream: aiohttp.ClientWebSocketResponse) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            await upstream.close(code=_sendable(message.get("code", 1000)))
            return
        if message.get("text") is not None:
            await upstream.send_str(message["text"])
        elif message.get("bytes") is not None:
            await upstream.send_bytes(message["bytes"])


async def _runner_to_caller(upstream: aiohttp.ClientWebSocketResponse, send: Send) -> None:
    async for message in upstream:
        if message.type == aiohttp.WSMsgType.TEXT:
            await send({"type": "websocket.send", "text": message.data})
        elif message.type == aiohttp.WSMsgType.BINARY:
            await send({"type": "websocket.send", "bytes": message.data})
        elif message.type == aiohttp.WSMsgType.ERROR:
            break
    code = upstream.close_code
    await send({"type": "websocket.close", "code": _sendable(code or _INTERNAL_ERROR)})


def _sendable(code: int) -> int:
    """Codes 1005/1006/1015 describe a close but may not be sent in a close frame."""
    if code == 1005:
        return 1000
    if code in (1006, 1015):
        return _INTERNAL_ERROR
    return code


async def _deny(
    scope: Scope, send: Send, status: int, detail: str, error_type: str, rid: str
) -> None:
    """Refuse the handshake: an HTTP error if the server allows it, else a close frame."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        body = error_body(detail, error_type)
        await send({
            "type": "websocket.http.response.start", "status": status,
            "headers": error_headers(body, error_type, rid),
        })  # fmt: skip
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": _POLICY_VIOLATION, "reason": detail[:120]})
