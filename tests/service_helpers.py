"""Helpers for tests that drive the real service: start it, call it, make bundles for it.

``ServiceProcess`` runs ``python -m buildsvc --port 0`` in a subprocess and waits for its
ready file; ``make_bundle`` builds a manifest + blobs from app source without the CLI (the
class is cloudpickled by value, as packaging does); ``upload``/``deploy`` speak contract 2.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import httpx

from falcli.options import resolve_options
from falcli.packaging.manifest import seal

__all__ = [
    "ECHO_APP",
    "Bundle",
    "ServiceProcess",
    "deploy",
    "leftover_processes",
    "make_bundle",
    "upload",
    "wait_until",
]

START_TIMEOUT = 60.0
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"

ECHO_APP = """
import os
import fal
from pydantic import BaseModel


class Msg(BaseModel):
    text: str


class Echo(fal.App):
    def setup(self):
        if os.path.exists("crash-in-setup"):
            raise RuntimeError("setup exploded on purpose")
        self.prefix = "echo: "

    @fal.endpoint("/")
    def run(self, msg: Msg) -> Msg:
        return Msg(text=self.prefix + msg.text)
"""

_module_ids = itertools.count()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@dataclass
class ServiceProcess:
    """A running ``python -m buildsvc``; ``stop()`` is safe to call twice."""

    data_dir: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    admin_key: str = ""
    ready: dict[str, Any] = field(default_factory=dict)

    def start(self) -> ServiceProcess:
        ready_file = self.data_dir.parent / f"{self.data_dir.name}-ready.json"
        ready_file.unlink(missing_ok=True)
        log = open(self.data_dir.parent / f"{self.data_dir.name}-service.log", "ab")  # noqa: SIM115
        argv = [sys.executable, "-m", "buildsvc", "--port", "0", "--data-dir", str(self.data_dir),
                "--ready-file", str(ready_file), *self.args]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(lambda: ready_file.exists() or self.proc.poll() is not None,  # type: ignore[union-attr]
                   START_TIMEOUT, "the service's ready file")  # fmt: skip
        if not ready_file.exists():
            raise AssertionError(f"service exited with {self.proc.returncode}:\n{self.log()}")
        self.ready = json.loads(ready_file.read_text())
        self.url = self.ready["url"]
        self.admin_key = Path(self.ready["admin_key_file"]).read_text().strip()
        return self

    def log(self) -> str:
        path = self.data_dir.parent / f"{self.data_dir.name}-service.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def client(self, key: str | None = None, **kwargs: Any) -> httpx.Client:
        """An httpx client on the service; ``key=None`` means the admin key, "" means none."""
        key = self.admin_key if key is None else key
        headers = {"Authorization": f"Key {key}"} if key else {}
        kwargs.setdefault("timeout", 120)
        return httpx.Client(base_url=self.url, headers=headers, **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"service ignored signal {sig} for {timeout}s") from None

    def restart(self) -> ServiceProcess:
        self.stop()
        return self.start()


def leftover_processes(data_dir: Path) -> list[int]:
    """Pids of live processes whose working directory is inside ``data_dir`` (runners)."""
    root = str(data_dir.resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if (cwd == root or cwd.startswith(root + "/")) and state != "Z":
            found.append(int(entry.name))
    return found


@dataclass
class Bundle:
    manifest: dict[str, Any]
    blobs: dict[str, bytes]


def make_bundle(
    source: str = ECHO_APP,
    class_name: str = "Echo",
    *,
    app_name: str = "echo",
    requirements: list[list[str]] | None = None,
    files: dict[str, bytes] | None = None,
    options: dict[str, Any] | None = None,
    tmp_dir: Path,
) -> Bundle:
    """A sealed manifest + blobs for ``class_name`` in ``source``, as packaging makes them."""
    payload = _pickle_class(source, class_name, tmp_dir)
    blobs = {_sha(payload): payload}
    file_map = {}
    for rel, data in (files or {}).items():
        blobs[_sha(data)] = data
        file_map[rel] = _sha(data)
    manifest = {
        "format": 1,
        "app_name": app_name,
        "kind": "app",
        "python": PYTHON,
        "payload": _sha(payload),
        "requirements": requirements or [],
        "files": file_map,
        "options": resolve_options(options or {}),
        "openapi": {},
    }
    return Bundle(dict(seal(manifest)), blobs)


def _pickle_class(source: str, class_name: str, tmp_dir: Path) -> bytes:
    name = f"svc_test_app_{os.getpid()}_{next(_module_ids)}"
    path = tmp_dir / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(getattr(module, class_name))
    finally:
        cloudpickle.unregister_pickle_by_value(module)
        path.unlink()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_of(blobs: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for sha, data in blobs.items():
            info = tarfile.TarInfo(sha)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def upload(client: httpx.Client, blobs: dict[str, bytes]) -> list[str]:
    """Upload the blobs the service lacks; return their hashes."""
    missing = client.post("/v1/blobs/missing", json={"hashes": sorted(blobs)})
    missing.raise_for_status()
    wanted = missing.json()["missing"]
    if wanted:
        resp = client.post("/v1/blobs", content=tar_of({sha: blobs[sha] for sha in wanted}))
        assert resp.status_code == 200, resp.text
    return list(wanted)


def deploy(client: httpx.Client, bundle: Bundle, **request: Any) -> Iterator[dict[str, Any]]:
    """Upload, POST /v1/apps/deploy, and yield the NDJSON events as they arrive."""
    upload(client, bundle.blobs)
    body = {"manifest": bundle.manifest, "app_name": bundle.manifest["app_name"],
            "auth": "private", "ephemeral": False, **request}  # fmt: skip
    with client.stream("POST", "/v1/apps/deploy", json=body) as resp:
        if resp.status_code != 200:
            resp.read()
            yield {"status": resp.status_code, **resp.json()}
            return
        for line in resp.iter_lines():
            if line.strip():
                yield json.loads(line)
