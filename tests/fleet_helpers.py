"""Shared helpers for the fleet, gateway and log tests: a real stack in one event loop.

``stack()`` runs the real SQLite store, keyring, log hub, local process backend, fleet and
gateway (served by uvicorn on 127.0.0.1 port 0). ``Stack.deploy`` commits a revision whose
runners are real processes: the revision's ``python`` is a shim that runs
``tests/fleet_runner.py`` (see there) instead of the SDK's agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from buildsvc.auth import Keyring
from buildsvc.config import ServerConfig
from buildsvc.fleet import Fleet
from buildsvc.gateway.proxy import Gateway
from buildsvc.logs import LogHub
from buildsvc.records import AppRecord, RevisionRecord
from buildsvc.runtime.gpus import GpuAllocator
from buildsvc.runtime.local import LocalBackend
from buildsvc.store import SQLiteStore, new_revision_id

__all__ = ["OWNER", "Stack", "stack", "wait_for"]

OWNER = "alice"
_RUNNER = Path(__file__).with_name("fleet_runner.py")
_OPTIONS = {
    "keep_alive": 60, "min_concurrency": 0, "max_concurrency": 10, "max_multiplexing": 1,
    "request_timeout": 60, "startup_timeout": 30, "termination_grace_period_seconds": 2,
    "num_gpus": 0,
}  # fmt: skip


class _QuietServer(uvicorn.Server):
    """uvicorn without signal handlers: the test process keeps its own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Stack:
    tmp: Path
    store: SQLiteStore
    keyring: Keyring
    logs: LogHub
    gpus: GpuAllocator
    fleet: Fleet
    gateway: Gateway
    url: str

    def deploy(
        self,
        name: str,
        *,
        auth: str = "public",
        behavior: dict[str, Any] | None = None,
        **options: Any,
    ) -> tuple[AppRecord, RevisionRecord]:
        """Commit a new revision of ``alice/<name>`` served by stand-in runners."""
        rev_id = new_revision_id()
        workdir = self.tmp / "apps" / name / rev_id
        workdir.mkdir(parents=True)
        (workdir / "behavior.json").write_text(json.dumps(behavior or {}))
        python = workdir / "python"
        python.write_text(f"#!/bin/sh\nexec {sys.executable} {_RUNNER}\n")
        python.chmod(0o755)
        (workdir / "payload.pkl").write_bytes(b"unused")
        manifest = {"kind": "app", "app_name": name, "options": {**_OPTIONS, **options}}
        revision = RevisionRecord(
            id=rev_id, owner=OWNER, app=name, bundle_hash="0" * 64, manifest=manifest,
            env_key="test", python=str(python), workdir=str(workdir),
            payload=str(workdir / "payload.pkl"),
        )  # fmt: skip
        app = self.store.commit_revision(AppRecord(OWNER, name, auth, False, None), revision)
        return app, revision

    def runners(self, name: str) -> list[Any]:
        return self.fleet.list_runners(OWNER, name)


@contextlib.asynccontextmanager
async def stack(tmp: Path, *, reap_interval: float = 0.1, gpus: int = 0) -> AsyncIterator[Stack]:
    store = SQLiteStore(tmp / "store.sqlite")
    keyring = Keyring(store, b"s" * 32)
    logs = LogHub(tmp)
    allocator = GpuAllocator(list(range(gpus)), emulated=True)
    config = ServerConfig(data_dir=tmp, extra={"fleet.reap_interval": str(reap_interval)})
    fleet = Fleet(store=store, backend=LocalBackend(), gpus=allocator, logs=logs, config=config)
    gateway = Gateway(store=store, fleet=fleet, keys=keyring, logs=logs, config=config)
    await fleet.start()
    sock = socket.socket()
    # Accepted sockets inherit TCP_NODELAY; without it the plain asyncio loop adds ~40 ms
    # (Nagle + delayed ACK) to every response written in more than one piece.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    server = _QuietServer(uvicorn.Config(
        gateway, lifespan="off", log_level="warning", access_log=False,
        ws="websockets-sansio", http="httptools",
    ))  # fmt: skip
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await wait_for(lambda: server.started, what="the gateway to listen")
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield Stack(tmp, store, keyring, logs, allocator, fleet, gateway, url)
    finally:
        server.should_exit = True
        await task
        await gateway.close()
        await fleet.close()
        logs.close()
        store.close()


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float = 15.0, what: str = ""
) -> None:
    """Poll ``condition`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.02)
