"""Helpers for the queue tests: the real store, fleet, gateway and queue in one event loop.

``queue_stack()`` runs the real SQLite stores, keyring, log hub, local process backend, fleet,
gateway and queue behind one ASGI app (``/queue/...`` -> queue, else gateway, as the service
routes them), served by uvicorn on 127.0.0.1 port 0, optionally over TLS. ``QStack.deploy``
commits a revision whose runners are real processes running ``tests/queue_runner.py``.
``self_signed()`` writes a certificate for 127.0.0.1 (for the unmodified fal-client).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import stack_helpers
from stack_helpers import commit_stand_in, self_signed, serve_asgi

from buildsvc.auth import Keyring
from buildsvc.config import ServerConfig
from buildsvc.fleet import Fleet
from buildsvc.gateway.proxy import Gateway
from buildsvc.logs import LogHub
from buildsvc.queue import PREFIX, Queue, QueueSettings, open_queue
from buildsvc.records import RevisionRecord
from buildsvc.runtime.gpus import GpuAllocator
from buildsvc.runtime.local import LocalBackend
from buildsvc.store import SQLiteStore

__all__ = ["OWNER", "QStack", "calls", "queue_stack", "self_signed", "wait_for"]

OWNER = "alice"
_RUNNER = Path(__file__).with_name("queue_runner.py")
_OPTIONS = {
    "keep_alive": 60, "min_concurrency": 0, "max_concurrency": 2, "max_multiplexing": 1,
    "request_timeout": 60, "startup_timeout": 30, "termination_grace_period_seconds": 1,
    "num_gpus": 0, "skip_retry_conditions": [],
}  # fmt: skip


@dataclass
class QStack:
    data: Path
    store: SQLiteStore
    keyring: Keyring
    logs: LogHub
    fleet: Fleet
    gateway: Gateway
    queue: Queue
    url: str

    def deploy(self, name: str, *, auth: str = "public", **options: Any) -> RevisionRecord:
        """Commit a new revision of ``alice/<name>`` served by ``queue_runner.py``."""
        return deploy(self.store, self.data, name, auth=auth, **options)

    def calls(self, name: str) -> list[list[str]]:
        return calls(self.store, name)

    def q(self, path: str) -> str:
        return f"{self.url}{PREFIX}/{OWNER}/{path}"


def deploy(store: SQLiteStore, data: Path, name: str, *, auth: str = "public",
           **options: Any) -> RevisionRecord:  # fmt: skip
    options = {**_OPTIONS, **options}
    return commit_stand_in(store, data, OWNER, name, _RUNNER, options, auth=auth)[1]


def calls(store: SQLiteStore, name: str) -> list[list[str]]:
    """Every call the runners of the app's current revision received: [request id, path, pid]."""
    resolved = store.resolve(OWNER, name)
    assert resolved is not None and resolved[1] is not None
    log = Path(resolved[1].workdir) / "calls.log"
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def _router(queue: Queue, gateway: Gateway) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if path == PREFIX or path.startswith(PREFIX + "/"):
            await queue.asgi(scope, receive, send)
        else:
            await gateway(scope, receive, send)

    return app


@contextlib.asynccontextmanager
async def queue_stack(
    data: Path, *, lease_seconds: float = 30.0, tls: tuple[Path, Path] | None = None,
    port: int = 0,
) -> AsyncIterator[QStack]:  # fmt: skip
    data.mkdir(parents=True, exist_ok=True)
    store = SQLiteStore(data / "store.sqlite")
    keyring = Keyring(store, b"s" * 32)
    logs = LogHub(data)
    config = ServerConfig(data_dir=data, extra={"fleet.reap_interval": "0.2"})
    fleet = Fleet(store=store, backend=LocalBackend(), gpus=GpuAllocator([], emulated=True),
                  logs=logs, config=config)  # fmt: skip
    gateway = Gateway(store=store, fleet=fleet, keys=keyring, logs=logs, config=config)
    await fleet.start()
    queue = await open_queue(
        data_dir=data, apps=store, keys=keyring, fleet=fleet, logs=logs,
        session=gateway.session, settings=QueueSettings(lease_seconds=lease_seconds),
        webhook_base_delay=0.05,
    )  # fmt: skip
    try:
        async with serve_asgi(_router(queue, gateway), port=port, tls=tls,
                              what="the service") as url:  # fmt: skip
            yield QStack(data, store, keyring, logs, fleet, gateway, queue, url)
    finally:
        await queue.close()
        await gateway.close()
        await fleet.close()
        logs.close()
        store.close()


async def wait_for(
    condition: Callable[[], Any | Awaitable[Any]], timeout: float = 20.0, what: str = ""
) -> Any:
    """Poll ``condition`` until truthy and return it; fail naming ``what`` after ``timeout``."""
    return await stack_helpers.wait_for(condition, timeout, what)


def dump(data: Any) -> str:
    return json.dumps(data, indent=1)
