"""The plumbing the stand-in runners share (``fleet_runner.py``, ``queue_runner.py``).

A stand-in runner is a real process speaking contract 3: it reports its state as JSON lines on
the control pipe, exits when the service's end of the lifeline closes, and serves a raw ASGI
app on 127.0.0.1. The runner scripts import this module from their own folder (``tests/``).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from typing import Any

__all__ = ["control", "read_body", "serve", "watch_lifeline"]


def control(state: str, **fields: Any) -> None:
    """Report ``state`` (and ``fields``, e.g. ``port``) on the control pipe."""
    line = json.dumps({"state": state, **fields}) + "\n"
    os.write(int(os.environ["FAL_AGENT_CONTROL_FD"]), line.encode())


def watch_lifeline() -> None:
    """Exit at once when the service's end of the lifeline pipe closes."""
    fd = int(os.environ["FAL_AGENT_LIFELINE_FD"])

    def watch() -> None:
        while os.read(fd, 64):
            pass
        os._exit(9)  # the service is gone: so are we

    threading.Thread(target=watch, daemon=True).start()


async def read_body(receive: Any) -> bytes:
    """The whole body of an ASGI HTTP request."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def serve(app: Any, **options: Any) -> None:
    """Serve ``app`` on a free port, report IDLE with it, and run until the server stops.
    ``options`` go to ``uvicorn.Config`` (e.g. ``ws=``)."""
    import uvicorn  # only once setup is reported: the import costs startup time

    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False,
                            http="httptools", **options)  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            return
        await asyncio.sleep(0.005)
    control("IDLE", port=sock.getsockname()[1])
    await task
