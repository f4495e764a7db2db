"""What the in-process test stacks share (``fleet_helpers``, ``queue_helpers``) and a
certificate for the TLS tests.

``serve_asgi()`` serves an ASGI app with uvicorn on 127.0.0.1 (port 0 unless told), optionally
over TLS, and stops it on exit. ``wait_for()`` polls a condition with a deadline instead of
sleeping and hoping. ``commit_stand_in()`` commits a revision whose runners are a stand-in
runner script (``fleet_runner.py``, ``queue_runner.py``). ``self_signed()`` writes a
certificate for 127.0.0.1 and localhost.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import inspect
import ipaddress
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn

from buildsvc.records import AppRecord, RevisionRecord
from buildsvc.store import SQLiteStore, new_revision_id

__all__ = ["commit_stand_in", "self_signed", "serve_asgi", "wait_for"]


class _QuietServer(uvicorn.Server):
    """uvicorn without signal handlers: the test process keeps its own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serve_asgi(
    app: Any, *, port: int = 0, tls: tuple[Path, Path] | None = None, what: str = "the server",
    **options: Any,
) -> AsyncIterator[str]:  # fmt: skip
    """Serve ``app`` and yield its base URL; ``options`` go to ``uvicorn.Config``."""
    sock = socket.socket()
    # Accepted sockets inherit TCP_NODELAY; without it the plain asyncio loop adds ~40 ms
    # (Nagle + delayed ACK) to every response written in more than one piece.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart on the same port
    sock.bind(("127.0.0.1", port))
    server = _QuietServer(uvicorn.Config(
        app, lifespan="off", log_level="warning", access_log=False, http="httptools",
        ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None, **options,
    ))  # fmt: skip
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await wait_for(lambda: server.started, what=f"{what} to listen")
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


async def wait_for(
    condition: Callable[[], Any | Awaitable[Any]], timeout: float = 15.0, what: str = ""
) -> Any:
    """Poll ``condition`` until truthy and return it; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.02)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate + key for 127.0.0.1 / localhost, valid for a day, as PEM files."""
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


def commit_stand_in(
    store: SQLiteStore, root: Path, owner: str, name: str, runner: Path,
    options: dict[str, Any], *, auth: str = "public", files: dict[str, str] | None = None,
) -> tuple[AppRecord, RevisionRecord]:  # fmt: skip
    """Commit a new revision of ``owner/name`` whose ``python`` is a shim running the
    stand-in ``runner`` script; ``files`` are written into its workdir first."""
    rev_id = new_revision_id()
    workdir = root / "apps" / name / rev_id
    workdir.mkdir(parents=True)
    for filename, text in (files or {}).items():
        (workdir / filename).write_text(text)
    python = workdir / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {runner}\n")
    python.chmod(0o755)
    (workdir / "payload.pkl").write_bytes(b"unused")
    manifest = {"kind": "app", "app_name": name, "options": options}
    revision = RevisionRecord(
        id=rev_id, owner=owner, app=name, bundle_hash="0" * 64, manifest=manifest,
        env_key="test", python=str(python), workdir=str(workdir),
        payload=str(workdir / "payload.pkl"),
    )  # fmt: skip
    app = store.commit_revision(AppRecord(owner, name, auth, False, None), revision)
    return app, revision
