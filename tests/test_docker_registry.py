"""Pushing built images to a real registry: Debian's ``docker-registry`` (distribution 2.x)
on 127.0.0.1, the service with ``--runtime docker --registry 127.0.0.1:PORT``, the `fal`
CLI deploying through it. dockerd talks plain http to registries on 127.0.0.0/8 by default.

The registry binary comes from scripts/docker-setup.sh; without it the tests skip, except
under CI (``CI=true``), where a missing binary is a failure, as a missing engine is.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sqlite3
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker_helpers
import httpx
import pytest
from docker_helpers import cli_env, fal_cli, write_project
from service_helpers import ServiceProcess, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

docker_client = docker_helpers.docker_client  # module fixture: a live engine + base images

_START_TIMEOUT_S = 20.0

APP = """
import fal


class Pushed(fal.App):
    mark = "{mark}"

    @fal.endpoint("/")
    def run(self) -> dict:
        return {{"ok": True}}
"""


class Registry:
    """A ``docker-registry serve`` process storing under ``root``, on ``127.0.0.1:port``."""

    def __init__(self, binary: str, root: Path, port: int) -> None:
        self.host = f"127.0.0.1:{port}"
        self.url = f"http://{self.host}"
        self._root = root
        self._log = root / "registry.log"
        config = root / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {root / 'storage'}\nhttp:\n  addr: {self.host}\n")
        with open(self._log, "ab") as log:
            self._proc = subprocess.Popen([binary, "serve", str(config)], stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self) -> None:
        def answers() -> bool:
            if self._proc.poll() is not None:
                raise AssertionError(f"docker-registry exited ({self._proc.returncode}):\n"
                                     f"{self._log.read_text(errors='replace')[-2000:]}")
            try:
                return httpx.get(f"{self.url}/v2/", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(answers, _START_TIMEOUT_S, f"the registry at {self.url}/v2/ to answer")

    def get(self, path: str) -> Any:
        answer = httpx.get(f"{self.url}{path}", timeout=10)
        assert answer.status_code == 200, f"GET {path}: {answer.status_code} {answer.text}"
        return answer.json()

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)


def _registry_binary() -> str:
    found = shutil.which("docker-registry") or (
        "/usr/bin/docker-registry" if os.path.exists("/usr/bin/docker-registry") else None)
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("no docker-registry binary under CI; scripts/docker-setup.sh installs "
                    "Debian's docker-registry package: run it first")
    pytest.skip("no docker-registry binary; run scripts/docker-setup.sh (Debian's "
                "docker-registry package)")


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    binary = _registry_binary()
    root = tmp_path / "registry"
    root.mkdir()
    reg = Registry(binary, root, _free_port())
    try:
        reg.wait_ready()
        yield reg
    finally:
        reg.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _revision_images(svc: ServiceProcess, app: str) -> list[str]:
    with sqlite3.connect(svc.data_dir / "service.db") as db:
        rows = db.execute("SELECT image FROM revisions WHERE app = ? ORDER BY created_at",
                          (app,)).fetchall()
    return [str(image) for (image,) in rows]


def _deploy(svc: ServiceProcess, tmp_path: Path, app: str) -> subprocess.CompletedProcess[str]:
    source = APP.format(mark=uuid.uuid4().hex)  # a new payload: a new image tag
    project = write_project(tmp_path / "p", app, "Pushed", source)
    return fal_cli(["deploy", app], project, cli_env(tmp_path / "home", svc))


def test_deploy_pushes_the_image_to_the_registry_and_a_failed_push_fails_it(
        service_factory: Callable[..., ServiceProcess], docker_client: Any,
        registry: Registry, tmp_path: Path) -> None:
    svc = service_factory("--runtime", "docker", "--registry", registry.host)
    deployed = _deploy(svc, tmp_path, "reg-push")
    assert deployed.returncode == 0, deployed.stderr
    (image,) = _revision_images(svc, "reg-push")
    repo, _, tag = image.partition(":")
    assert repo == "fal-app" and len(tag) == 40, image
    target = f"{registry.host}/{image}"
    assert f"pushing {target}\n" in deployed.stderr  # the build log tells the push
    pushed = re.search(rf"pushed {re.escape(target)} \((sha256:[0-9a-f]{{64}})\)",
                       deployed.stderr)
    assert pushed, deployed.stderr[-2000:]
    assert repo in registry.get("/v2/_catalog")["repositories"]
    assert tag in registry.get(f"/v2/{repo}/tags/list")["tags"]
    manifest = httpx.get(f"{registry.url}/v2/{repo}/manifests/{tag}", timeout=10, headers={
        "Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    assert manifest.status_code == 200 and manifest.json()["layers"], manifest.text
    assert manifest.headers["Docker-Content-Digest"] == pushed.group(1)  # what we logged

    registry.stop()  # nothing listens there now: the next push cannot reach it
    failed = _deploy(svc, tmp_path, "reg-push")
    assert failed.returncode == 3, failed.stderr
    assert "build_failed" in failed.stderr and f"pushing {registry.host}/fal-app:" in failed.stderr
    assert f"Start the registry at {registry.host} or fix the server's --registry" \
        in failed.stderr  # names the registry and the fix
    assert "connection refused" in failed.stderr  # the engine's own reason
    assert _revision_images(svc, "reg-push") == [image]  # the failed deploy went nowhere
