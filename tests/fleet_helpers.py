"""Shared helpers for the fleet, gateway and log tests: a real stack in one event loop.

``stack()`` runs the real SQLite store, keyring, log hub, local process backend, fleet and
gateway (served by uvicorn on 127.0.0.1 port 0). ``Stack.deploy`` commits a revision whose
runners are real processes: the revision's ``python`` is a shim that runs
``tests/fleet_runner.py`` (see there) instead of the SDK's agent.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stack_helpers import commit_stand_in, serve_asgi, wait_for

from buildsvc.auth import Keyring
from buildsvc.config import ServerConfig
from buildsvc.fleet import Fleet
from buildsvc.gateway.proxy import Gateway
from buildsvc.logs import LogHub
from buildsvc.records import AppRecord, RevisionRecord
from buildsvc.runtime.gpus import GpuAllocator
from buildsvc.runtime.local import LocalBackend
from buildsvc.store import SQLiteStore

__all__ = ["OWNER", "Stack", "stack", "wait_for"]

OWNER = "alice"
_RUNNER = Path(__file__).with_name("fleet_runner.py")
_OPTIONS = {
    "keep_alive": 60, "min_concurrency": 0, "max_concurrency": 10, "max_multiplexing": 1,
    "request_timeout": 60, "startup_timeout": 30, "termination_grace_period_seconds": 2,
    "num_gpus": 0,
}  # fmt: skip


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
        return commit_stand_in(
            self.store, self.tmp, OWNER, name, _RUNNER, {**_OPTIONS, **options}, auth=auth,
            files={"behavior.json": json.dumps(behavior or {})},
        )

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
    try:
        async with serve_asgi(gateway, what="the gateway", ws="websockets-sansio") as url:
            yield Stack(tmp, store, keyring, logs, allocator, fleet, gateway, url)
    finally:
        await gateway.close()
        await fleet.close()
        logs.close()
        store.close()

