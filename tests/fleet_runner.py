"""A stand-in runner for the fleet and gateway tests: a real process speaking contract 3.

The local backend starts ``<python> -m buildsvc.runtime.agent``; the tests point ``python``
at a shim that runs this file instead, so the fleet and gateway are exercised against real
processes and real sockets without depending on the SDK. It reports SETUP / IDLE (with its
port) / FAILED on the control pipe, dies with the service (lifeline), and serves a raw ASGI
app with the endpoints the tests need. Behaviour knobs come from ``behavior.json`` in the
working directory (the revision's workdir).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from runner_helpers import control, read_body, serve, watch_lifeline

_ACTIVE = {"now": 0, "max": 0}


async def _json(send: Any, payload: Any, status: int = 200, headers: tuple = ()) -> None:
    body = json.dumps(payload).encode()
    length = (b"content-length", str(len(body)).encode())
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), length, *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _sleep(scope: Any, send: Any) -> None:
    seconds = float(dict(_query(scope)).get("s", "0.3"))
    _ACTIVE["now"] += 1
    _ACTIVE["max"] = max(_ACTIVE["max"], _ACTIVE["now"])
    try:
        await asyncio.sleep(seconds)
    finally:
        _ACTIVE["now"] -= 1
    await _json(
        send,
        {"pid": os.getpid(), "max_active": _ACTIVE["max"]},
        headers=((b"x-fal-runner-hints", f"pid-{os.getpid()}".encode()),),
    )


async def _stream(send: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream")],
        }
    )
    await send(
        {
            "type": "http.response.body",
            "more_body": True,
            "body": b'data: {"n": 1, "t": %f}\n\n' % time.time(),
        }
    )
    deadline = time.monotonic() + 20
    while not Path("gate").exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await send(
        {
            "type": "http.response.body",
            "more_body": True,
            "body": b'data: {"n": 2, "t": %f}\n\n' % time.time(),
        }
    )
    await send({"type": "http.response.body", "body": b""})


def _query(scope: Any) -> list[tuple[str, str]]:
    raw = scope.get("query_string", b"").decode()
    return [tuple(p.split("=", 1)) for p in raw.split("&") if "=" in p]  # type: ignore[misc]


async def _http(scope: Any, receive: Any, send: Any) -> None:
    path = scope["path"]
    body = await read_body(receive)
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    if path == "/health":
        await _json(send, {"version": "test"})
    elif path == "/echo":
        await _json(
            send,
            {
                "pid": os.getpid(),
                "body": body.decode(),
                "headers": headers,
                "query": scope.get("query_string", b"").decode(),
                "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            },
        )
    elif path == "/sleep":
        await _sleep(scope, send)
    elif path == "/stream":
        await _stream(send)
    elif path == "/log":
        print(f"endpoint log line {headers.get('x-fal-request-id')}", flush=True)
        await _json(send, {"pid": os.getpid()})
    elif path == "/crash":
        os._exit(3)
    elif path == "/unavailable":
        await _json(send, {"detail": "out of memory"}, status=503)
    else:
        await _json(send, {"detail": f"Path {path} not found"}, status=404)


async def _websocket(scope: Any, receive: Any, send: Any) -> None:
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is not None and text.startswith("close:"):
            await send({"type": "websocket.close", "code": int(text.split(":")[1])})
            return
        if text is not None:
            await send({"type": "websocket.send", "text": f"echo:{text}"})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"][::-1]})


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await _http(scope, receive, send)
    elif scope["type"] == "websocket":
        await _websocket(scope, receive, send)


def main() -> None:
    watch_lifeline()
    control("SETUP")
    behavior = json.loads(Path("behavior.json").read_text())
    time.sleep(behavior.get("setup_delay", 0))
    if behavior.get("fail_setup"):
        try:
            raise RuntimeError("model weights missing: setup() cannot go on")
        except RuntimeError:
            import traceback

            error = traceback.format_exc()
        sys.stderr.write(error)
        control("FAILED", error=error)
        sys.exit(1)
    print("runner setup done", flush=True)
    asyncio.run(serve(app, ws="websockets-sansio"))


if __name__ == "__main__":
    main()
