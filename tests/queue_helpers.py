"""Helpers for the queue tests: the real store, fleet, gateway and queue in one event loop.

``queue_stack()`` runs the real SQLite stores, keyring, log hub, local process backend, fleet,
gateway and queue behind one ASGI app (``/queue/...`` -> queue, else gateway, as the service
routes them), served by uvicorn on 127.0.0.1 port 0, optionally over TLS. ``QStack.deploy``
commits a revision whose runners are real processes running ``tests/queue_runner.py``.
``self_signed()`` writes a certificate for 127.0.0.1 (for the unmodified fal-client).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
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
from buildsvc.queue import PREFIX, Queue, QueueSettings, open_queue
from buildsvc.records import AppRecord, RevisionRecord
from buildsvc.runtime.gpus import GpuAllocator
from buildsvc.runtime.local import LocalBackend
from buildsvc.store import SQLiteStore, new_revision_id

__all__ = ["OWNER", "QStack", "calls", "queue_stack", "self_signed", "wait_for"]

OWNER = "alice"
_RUNNER = Path(__file__).with_name("queue_runner.py")
_OPTIONS = {
    "keep_alive": 60, "min_concurrency": 0, "max_concurrency": 2, "max_multiplexing": 1,
    "request_timeout": 60, "startup_timeout": 30, "termination_grace_period_seconds": 1,
    "num_gpus": 0, "skip_retry_conditions": [],
}  # fmt: skip


class _QuietServer(uvicorn.Server):
    """uvicorn without signal handlers: the test process keeps its own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


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
    rev_id = new_revision_id()
    workdir = data / "apps" / name / rev_id
    workdir.mkdir(parents=True)
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
    store.commit_revision(AppRecord(OWNER, name, auth, False, None), revision)
    return revision


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
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = _QuietServer(uvicorn.Config(
        _router(queue, gateway), lifespan="off", log_level="warning", access_log=False,
        http="httptools", ssl_certfile=tls[0] if tls else None,
        ssl_keyfile=tls[1] if tls else None,
    ))  # fmt: skip
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await wait_for(lambda: server.started, what="the service to listen")
    url = f"{'https' if tls else 'http'}://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield QStack(data, store, keyring, logs, fleet, gateway, queue, url)
    finally:
        server.should_exit = True
        await task
        await queue.close()
        await gateway.close()
        await fleet.close()
        logs.close()
        store.close()


async def wait_for(
    condition: Callable[[], Any | Awaitable[Any]], timeout: float = 20.0, what: str = ""
) -> Any:
    """Poll ``condition`` until truthy and return it; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.02)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate + key for 127.0.0.1 / localhost, valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    )
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))  # fmt: skip
    return cert_path, key_path


def dump(data: Any) -> str:
    return json.dumps(data, indent=1)
