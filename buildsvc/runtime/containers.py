"""The service's whole Docker side behind one object: ``ContainerRuntime``.

It is connected lazily (a local-runtime server touches the engine only when an app with an
``image`` arrives) and holds the engine client, the ``ImageBuilder`` (plus the optional push
to a registry) and the ``DockerBackend`` (``runtime.docker``), for which it is itself a
``RuntimeBackend``. ``plan_for`` reads the image, machine type and exposed port off the
runner's revision.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from buildsvc.builder.image import ImageBuilder, ImageBuildError
from buildsvc.runtime.base import RunnerEvents, RunnerHandle, RunnerSpec, RunnerStartError
from buildsvc.runtime.docker import ContainerPlan, DockerBackend

__all__ = ["ContainerRuntime", "EngineUnavailable"]

_ENGINE_TIMEOUT_S = 120


class EngineUnavailable(Exception):
    """No Docker engine answers; the message names what was tried and the fix."""


class ContainerRuntime:
    """The service's Docker side, connected on first use (see the module docstring).

    ``everything``: every app runs in an image (``--runtime docker``); otherwise only apps
    with an ``image`` option do. ``revision_of(id)`` is the store's revision lookup.
    """

    def __init__(self, data_dir: Path, *, blob_path: Callable[[str], Path],
                 revision_of: Callable[[str], Any], everything: bool = False,
                 cpu_base: str = "fal-base-cpu:bookworm", gpu_base: str = "fal-base-gpu:bookworm",
                 registry: str | None = None, emulate_gpus: bool = False,
                 connect: Callable[[], Any] | None = None) -> None:
        self._root = Path(data_dir).absolute()
        self._blob_path = blob_path
        self._revision_of = revision_of
        self._everything = everything
        self._bases = (cpu_base, gpu_base)
        self._registry = registry.rstrip("/") if registry else None
        self._emulate_gpus = emulate_gpus
        self._connect = connect or _engine
        self._lock = threading.Lock()
        self._client: Any = None
        self._builder: ImageBuilder | None = None
        self._backend: DockerBackend | None = None

    def wanted(self, manifest: Mapping[str, Any]) -> bool:
        """Whether this app runs in an image (its deploy builds one)."""
        return self._everything or bool(manifest.get("options", {}).get("image"))

    def connect(self) -> None:
        """Reach the engine (blocking), then remove this service's orphaned containers."""
        with self._lock:
            if self._client is not None:
                return
            client = self._connect()
            self._builder = ImageBuilder(
                self._root / "images", client=client, blob_path=self._blob_path,
                cpu_base=self._bases[0], gpu_base=self._bases[1])
            self._backend = DockerBackend(client, data_dir=self._root, plan_for=self.plan_for,
                                          emulate_gpus=self._emulate_gpus)
            self._backend.remove_orphans()
            self._client = client

    async def ensure_image(self, manifest: Mapping[str, Any], *, no_cache: bool = False,
                           log: Callable[[str], None]) -> str:
        """The image tag of ``manifest``, built only if missing, pushed if a registry is set."""
        await asyncio.to_thread(self.connect)
        assert self._builder is not None
        built = await self._builder.ensure(manifest, no_cache=no_cache, log=log)
        log(f"image {built.tag} " + ("built" if built.built else "is up to date: no build"))
        if self._registry:
            await self._push(built.tag, log)
        return built.tag

    def plan_for(self, spec: RunnerSpec) -> ContainerPlan:
        revision = self._revision_of(spec.revision_id)
        if revision is None or not getattr(revision, "image", ""):
            raise RunnerStartError(spec.runner_id, f"revision {spec.revision_id} has no image; "
                                   "deploy the app again to build one")
        options = revision.manifest.get("options", {})
        types = options.get("machine_type") or ["XS"]
        machine = types if isinstance(types, str) else types[0]
        return ContainerPlan(revision.image, machine, options.get("exposed_port"),
                             _command(options.get("image")))

    # RuntimeBackend: runners of revisions that have an image

    async def start(self, spec: RunnerSpec, events: RunnerEvents) -> RunnerHandle:
        try:
            await asyncio.to_thread(self.connect)
        except EngineUnavailable as exc:
            raise RunnerStartError(spec.runner_id, str(exc)) from None
        assert self._backend is not None
        return await self._backend.start(spec, events)

    async def stop(self, handle: RunnerHandle, grace_period: float | None = None) -> None:
        if self._backend is not None:
            await self._backend.stop(handle, grace_period)

    async def wait(self, handle: RunnerHandle) -> int:
        assert self._backend is not None, "wait() before start()"
        return await self._backend.wait(handle)

    async def close(self) -> None:
        """Stop every container runner, then let go of the engine."""
        if self._backend is not None:
            await self._backend.close()
        if self._client is not None:
            self._client.close()

    async def _push(self, tag: str, log: Callable[[str], None]) -> None:
        """Push ``tag`` as ``<registry>/<tag>``; a failed push fails the deploy, since other
        machines could not pull the image. ``log`` runs on the event loop's thread only."""
        target = f"{self._registry}/{tag}"
        log(f"pushing {target}")
        errors, digest = await asyncio.to_thread(self._push_blocking, tag, target)
        if errors:
            raise ImageBuildError(
                f"pushing {target} failed: {errors[0]}; the image is built but other machines "
                f"could not pull it. Start the registry at {self._registry} or fix the "
                f"server's --registry {self._registry}; the Docker engine must reach it (a "
                "plain-http registry outside 127.0.0.0/8 must be in dockerd's "
                "insecure-registries) and be logged in there (docker login) if it needs auth; "
                "then deploy again",
                step=f"push {target}", detail="\n".join(errors))
        log(f"pushed {target}" + (f" ({digest})" if digest else ""))

    def _push_blocking(self, tag: str, target: str) -> tuple[list[str], str]:
        """The engine's push of ``target`` (tagged onto ``tag``): its errors and digest."""
        assert self._client is not None
        repository, _, reference = target.rpartition(":")
        errors: list[str] = []
        digest = ""
        try:
            self._client.images.get(tag).tag(repository, reference)
            stream = self._client.api.push(repository, tag=reference, stream=True, decode=True)
            for chunk in stream:
                if "error" in chunk:
                    errors.append(str(chunk["error"]).strip())
                aux = chunk.get("aux")
                digest = str(aux.get("Digest") or digest) if isinstance(aux, dict) else digest
        except Exception as exc:  # the engine refused before streaming (bad name, no auth)
            errors.append(str(exc))
        return errors, digest


def _command(image: Mapping[str, Any] | None) -> list[str] | None:
    """``ContainerImage`` entrypoint + cmd as one argv (a string is split like a shell)."""
    argv: list[str] = []
    for key in ("entrypoint", "cmd"):
        value = (image or {}).get(key)
        argv += shlex.split(value) if isinstance(value, str) else list(value or [])
    return argv or None


def _engine() -> Any:
    import docker

    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env(timeout=_ENGINE_TIMEOUT_S)
        client.ping()
    except Exception as exc:  # DockerException, or requests' own on a half-open socket
        raise EngineUnavailable(
            f"no Docker engine answers at {where} ({exc}); start one (bash "
            "scripts/docker-setup.sh) and restart the server with docker available, or "
            "deploy apps without an image on --runtime local") from None
    return client
