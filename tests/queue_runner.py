"""A stand-in runner for the queue tests: a real process speaking contract 3.

Started through a ``python`` shim in the revision's workdir (see ``queue_helpers``). Every
call appends ``<request id> <path> <pid>`` to ``calls.log`` in the workdir (shared by all
runners of the revision), so a test can count how often a request really ran. Endpoints:
``/echo``, ``/sleep?s=``, ``/log`` (prints a line), ``/crash`` (``os._exit`` mid-request),
``/code?status=N[&retry=0|1]`` (answers N, optionally with ``X-Fal-Needs-Retry``), ``/hang``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any
from urllib.parse import parse_qsl

from runner_helpers import control, read_body, serve, watch_lifeline


async def _reply(send: Any, payload: Any, status: int = 200, headers: tuple = ()) -> None:
    head = [(b"content-type", b"application/json"), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    received = time.time()
    body = await read_body(receive)
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    rid, path = headers.get("x-fal-request-id", "-"), scope["path"]
    query = dict(parse_qsl(scope.get("query_string", b"").decode()))
    if path != "/health":
        with open("calls.log", "a") as fh:
            fh.write(f"{rid} {path} {os.getpid()}\n")
    info = {"pid": os.getpid(), "t": received, "path": path, "body": body.decode()}
    if path == "/health":
        await _reply(send, {"version": "test"})
    elif path == "/echo":
        await _reply(send, {**info, "headers": headers, "query": query})
    elif path == "/sleep":
        print(f"sleeping for {rid}", flush=True)
        await asyncio.sleep(float(query.get("s", "0.5")))
        await _reply(send, info)
    elif path == "/log":
        print(f"endpoint log line {rid}", flush=True)
        await _reply(send, info)
    elif path == "/crash":
        os._exit(3)
    elif path == "/code":
        extra = ((b"x-fal-needs-retry", query["retry"].encode()),) if "retry" in query else ()
        await _reply(send, {"detail": f"status {query['status']}"}, int(query["status"]), extra)
    elif path == "/hang":
        await asyncio.sleep(3600)
    else:
        await _reply(send, {"detail": f"Path {path} not found"}, 404)


if __name__ == "__main__":
    watch_lifeline()
    control("SETUP")
    asyncio.run(serve(app))
