"""The service as one ASGI app: the management API under ``/v1``, the gateway elsewhere.

``create_app(config)`` returns a tiny dispatcher rather than a FastAPI app: gateway traffic
(``/{owner}/{app}/...``) goes straight to the raw-ASGI gateway and ``/queue/...`` to the
queue's ASGI app, without FastAPI's routing and middleware on the hot path. The dispatcher
owns the ASGI lifespan: startup builds every component in dependency order, shutdown closes
them in reverse (queue, gateway, then the fleet and its runners).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from buildsvc.api import Services, build_api
from buildsvc.auth import Keyring, ensure_admin_key, load_server_secret
from buildsvc.blobs import BlobStore
from buildsvc.builder.env import EnvBuilder
from buildsvc.config import ServerConfig
from buildsvc.deploy import Deployer
from buildsvc.fleet import Fleet
from buildsvc.gateway.proxy import Gateway
from buildsvc.logs import LogHub
from buildsvc.queue import QueueSettings, open_queue
from buildsvc.runtime.containers import ContainerRuntime
from buildsvc.runtime.gpus import GpuAllocator, check_machine_type
from buildsvc.runtime.local import LocalBackend
from buildsvc.store import SQLiteStore

__all__ = ["ServiceApp", "create_app"]

_log = logging.getLogger("buildsvc")
_QUEUE_PREFIX = "/queue/"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass
class _Components:
    services: Services
    gateway: Any
    queue: Any
    admin_key_file: str


class ServiceApp:
    """The ASGI callable ``python -m buildsvc`` serves."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.api = build_api()
        self.components: _Components | None = None
        self._stack = AsyncExitStack()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        path: str = scope.get("path", "")
        if path == "/v1" or path.startswith("/v1/"):
            await self.api(scope, receive, send)
        elif self.components is None:  # only when a server skips the lifespan protocol
            raise RuntimeError("the service was not started: serve it with lifespan='on'")
        elif path.startswith(_QUEUE_PREFIX):
            await self.components.queue.asgi(scope, receive, send)
        else:
            await self.components.gateway(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            await self.startup()
        except BaseException as exc:
            _log.exception("service startup failed")
            await send({"type": "lifespan.startup.failed", "message": f"{exc}"})
            await self.shutdown()
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self.shutdown()
        await send({"type": "lifespan.shutdown.complete"})

    async def startup(self) -> None:
        """Build every component; also usable without a server (tests, embedding)."""
        cfg = self.config.validate()
        data = cfg.data_dir
        store = SQLiteStore(data / "service.db")
        self._stack.callback(store.close)
        keys = Keyring(store, load_server_secret(data))
        admin_key_file = ensure_admin_key(keys, data, cfg.owner)
        _drop_ephemeral_apps(store)
        blobs = BlobStore(
            data / "blobs", max_bytes=cfg.max_upload_bytes, max_members=cfg.max_upload_members
        )
        gpus = GpuAllocator.detect(emulate=cfg.emulate_gpus)
        if gpus.emulated:
            _log.warning(
                "EMULATING %d GPU(s): apps asking for GPUs run on the CPU with "
                "CUDA_VISIBLE_DEVICES set; this is for development only",
                gpus.total,
            )
        logs = LogHub(data)
        self._stack.callback(logs.close)
        backend = LocalBackend()
        self._stack.push_async_callback(backend.close)
        containers = _containers(cfg, blobs, store, gpus.emulated)
        if cfg.runtime == "docker":  # no engine, no service: say so now, not at the 1st deploy
            await asyncio.to_thread(containers.connect)
        self._stack.push_async_callback(containers.close)
        fleet = Fleet(
            store=store, backend=backend, gpus=gpus, logs=logs, config=cfg,
            backend_for=lambda rev: containers if rev.image else backend,
        )  # fmt: skip
        await fleet.start()
        self._stack.push_async_callback(fleet.close)
        builder = EnvBuilder(data / "envs", blob_path=blobs.path)
        deployer = Deployer(
            store=store, blobs=blobs, builder=builder, fleet=fleet, logs=logs,
            check_gpus=lambda types, n: check_machine_type(types, n, gpus),
            bundles_dir=data / "bundles", prewarm=backend.prewarm, images=containers,
        )  # fmt: skip
        services = Services(cfg, store, keys, blobs, deployer, fleet, logs)
        gateway = Gateway(store=store, fleet=fleet, keys=keys, logs=logs, config=cfg)
        self._stack.push_async_callback(_close_if_closable, gateway)
        limits = QueueSettings(max_body_bytes=cfg.max_body_bytes, max_depth=cfg.max_queue_depth)
        queue = await open_queue(
            data_dir=data, apps=store, keys=keys, fleet=fleet, logs=logs,
            session=gateway.session, settings=limits, rate_check=gateway.check_rate,
        )  # fmt: skip
        self._stack.push_async_callback(queue.close)  # closes first: before runners stop
        self.api.state.services = services
        self.components = _Components(services, gateway, queue, str(admin_key_file))

    async def shutdown(self) -> None:
        """Stop runners, then close what startup opened, in reverse order."""
        await self._stack.aclose()


def create_app(config: ServerConfig) -> ServiceApp:
    return ServiceApp(config)


def _containers(
    cfg: ServerConfig, blobs: BlobStore, store: SQLiteStore, emulated_gpus: bool
) -> ContainerRuntime:
    """Images and container runners; the engine is reached on first use (or now, above)."""
    return ContainerRuntime(
        cfg.data_dir, blob_path=blobs.path, revision_of=store.get_revision,
        everything=cfg.runtime == "docker", cpu_base=cfg.docker_cpu_base,
        gpu_base=cfg.docker_gpu_base, registry=cfg.registry, emulate_gpus=emulated_gpus,
    )  # fmt: skip


def _drop_ephemeral_apps(store: SQLiteStore) -> None:
    """``fal run`` apps die with the process that ran their runners; forget them."""
    for app in store.list_apps():
        if app.ephemeral:
            store.delete_app(app.owner, app.name)
            _log.info("removed leftover ephemeral app %s/%s", app.owner, app.name)


async def _close_if_closable(obj: Any) -> None:
    close = getattr(obj, "aclose", None) or getattr(obj, "close", None)
    if close is not None:
        result = close()
        if hasattr(result, "__await__"):
            await result
