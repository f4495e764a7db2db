"""Fixtures for the Docker tests: a real engine (or a skip), manifests, an image builder.

The engine must be reachable (scripts/docker-setup.sh starts one); without one the tests
skip, except under CI (``CI=true``), where a missing engine is a failure.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from buildsvc.builder.image import DEFAULT_CPU_BASE, ImageBuilder
from buildsvc.runtime.base import RunnerSpec

__all__ = ["CLI", "Blobs", "cli_env", "containers_of", "docker_client", "fal_cli",
           "image_builder", "make_manifest", "spec_for", "write_project"]

_ROOT = Path(__file__).resolve().parent.parent


def _engine() -> Any:
    try:
        import docker

        client = docker.from_env(timeout=120)
        client.ping()
        return client
    except Exception as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"no Docker engine under CI ({exc}); .ci/run must run "
                        "scripts/docker-setup.sh first")
        pytest.skip(f"no Docker engine reachable ({exc}); run scripts/docker-setup.sh")


@pytest.fixture(scope="module")
def docker_client() -> Iterator[Any]:
    client = _engine()
    try:
        client.images.get(DEFAULT_CPU_BASE)
    except Exception:  # idempotent: builds the base images offline (~1.5 min once)
        subprocess.run(["bash", str(_ROOT / "scripts" / "docker-setup.sh")], check=True)
    yield client
    client.close()


class Blobs:
    """A tiny content-addressed blob store on disk (the service's BlobStore stands behind
    ``blob_path`` in production)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        (self.root / sha).write_bytes(data)
        return sha

    def path(self, sha: str) -> Path:
        return self.root / sha


@pytest.fixture(scope="module")
def image_builder(docker_client: Any, tmp_path_factory: pytest.TempPathFactory
                  ) -> tuple[ImageBuilder, Blobs]:
    root = tmp_path_factory.mktemp("images")
    blobs = Blobs(root / "blobs")
    return ImageBuilder(root / "builder", client=docker_client, blob_path=blobs.path), blobs


def make_manifest(blobs: Blobs, payload: bytes, *, files: dict[str, bytes] | None = None,
                  requirements: list[list[str]] | None = None, image: dict[str, Any] | None
                  = None, machine_type: str = "XS", kind: str = "app") -> dict[str, Any]:
    return {
        "format": 1, "app_name": "docker-test", "kind": kind, "python": "3.11",
        "payload": blobs.put(payload),
        "requirements": requirements or [],
        "files": {path: blobs.put(data) for path, data in (files or {}).items()},
        "options": {"machine_type": [machine_type], "image": image},
    }


def spec_for(runner_id: str, **overrides: Any) -> RunnerSpec:
    """A RunnerSpec for a container: host paths are unused (the image holds the app)."""
    fields: dict[str, Any] = {
        "runner_id": runner_id, "app_name": "docker-test", "revision_id": "rev1",
        "python": Path("/unused"), "workdir": Path("/unused"), "payload": Path("/unused"),
        "startup_timeout": 60.0, "grace_period": 5.0, "env": {"MARKS": "/data"},
    }
    fields.update(overrides)
    return RunnerSpec(**fields)


# -- driving the real service with the CLI ------------------------------------------------

CLI = [sys.executable, "-c", "from falcli.cli.main import main; main()"]


def cli_env(home: Path, svc: Any) -> dict[str, str]:
    """The environment of a `fal` subprocess talking to ``svc`` (a ServiceProcess)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAL_", "FALCLI_"))}
    env.update(FALCLI_HOME=str(home), COLUMNS="120", FAL_SERVER_URL=svc.url,
               FAL_KEY=svc.admin_key)
    # The repo first on sys.path: user code does `import fal`, the shim package lives there.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    return env


def fal_cli(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 240
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def write_project(root: Path, key: str, ref: str, source: str, *, extra: str = "",
                  files: dict[str, str] | None = None) -> Path:
    """A project with one app ``key`` (``ref`` into app.py); ``extra`` goes in its table."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "app.py").write_text(source)
    for name, text in (files or {}).items():
        (root / name).write_text(text)
    (root / "pyproject.toml").write_text(
        f'[project]\nname = "p-{key}"\nversion = "0.1.0"\n\n'
        f'[tool.fal.apps.{key}]\nref = "app.py::{ref}"\n{extra}')
    return root


def containers_of(client: Any, app: str) -> list[Any]:
    """Runner containers of ``app`` on the engine (any state)."""
    return list(client.containers.list(all=True, filters={"label": f"fal.app={app}"}))
