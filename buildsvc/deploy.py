"""Deploy orchestration: a checked manifest in, a live revision (and maybe a runner) out.

``Deployer.plan`` validates a deploy request without trusting the client (format, recomputed
hash, names, options, every blob present, GPU machine types) and raises ``DeployError`` before
anything changes. ``Deployer.run`` then streams events (contract 2): lay out the bundle's
files, build the env with uv's output relayed live, commit the revision and the app in one
store transaction (only after a successful build), tell the fleet, and for an ephemeral app
(``fal run``) start one runner and wait for it to be ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from buildsvc.api.views import app_urls, app_view, revision_view
from buildsvc.auth import AUTH_MODES
from buildsvc.blobs import BlobError, BlobStore, check_relpath, is_sha256
from buildsvc.builder.env import BuildError, Env
from buildsvc.builder.image import ImageBuildError
from buildsvc.records import AppRecord, RevisionRecord
from buildsvc.runtime.base import RunnerStartError
from buildsvc.runtime.containers import EngineUnavailable
from buildsvc.store import Store, new_revision_id
from falcli.packaging.manifest import (
    FORMAT_VERSION,
    canonical_json,
    manifest_hash,
    parse_blob_requirement,
)

__all__ = ["SCALE_KEYS", "DeployError", "DeployPlan", "Deployer", "check_app_name"]

_log = logging.getLogger(__name__)

SCALE_KEYS = (
    "keep_alive", "min_concurrency", "max_concurrency", "concurrency_buffer",
    "concurrency_buffer_perc", "max_multiplexing", "scaling_delay", "request_timeout",
    "startup_timeout",
)  # fmt: skip
_APP_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]*")
_PYTHON_RE = re.compile(r"3\.\d{1,2}")
_SDIST_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # a file name, never a path
_STRATEGIES = ("recreate", "rolling")
# option -> smallest allowed value; each must be an integer (None allowed where noted below)
_INT_OPTIONS = {
    "num_gpus": 0, "keep_alive": 0, "min_concurrency": 0, "max_concurrency": 1,
    "concurrency_buffer": 0, "concurrency_buffer_perc": 0, "max_multiplexing": 1,
    "scaling_delay": 0, "termination_grace_period_seconds": 0,
}  # fmt: skip
_POSITIVE_OPTIONS = ("request_timeout", "startup_timeout")


class DeployError(Exception):
    """A deploy request was refused before anything changed; the API answers ``status``."""

    def __init__(self, detail: str, error_type: str = "invalid_manifest", status: int = 400):
        super().__init__(detail)
        self.detail = detail
        self.error_type = error_type
        self.status = status


class _Builder(Protocol):
    async def ensure(
        self, python: str, layers: list[list[str]], *, no_cache: bool = False,
        log: Callable[[str], None] = ...,
    ) -> Env: ...  # fmt: skip


class _Images(Protocol):
    """Container images (``runtime.containers.ContainerRuntime``): which apps need one, build it."""

    def wanted(self, manifest: dict[str, Any]) -> bool: ...
    async def ensure_image(
        self, manifest: dict[str, Any], *, no_cache: bool = False, log: Callable[[str], None],
    ) -> str: ...  # fmt: skip


@dataclass(frozen=True)
class _Built:
    """What a build produced: the env (local runners) or the image (container runners)."""

    env_key: str
    python: str
    image: str = ""


class _Fleet(Protocol):
    async def ensure_runner(self, app: AppRecord, revision: RevisionRecord) -> Any: ...
    async def revision_changed(self, app: AppRecord, strategy: str) -> None: ...
    def list_runners(self, owner: str | None = None, app: str | None = None) -> list[Any]: ...


@dataclass(frozen=True)
class DeployPlan:
    """A validated request: everything ``run`` needs, nothing left to check."""

    owner: str
    app_name: str
    manifest: dict[str, Any]
    auth: str
    ephemeral: bool
    strategy: str
    message: str
    no_cache: bool
    reset_scale: bool


def check_app_name(name: object) -> str:
    if not isinstance(name, str) or not _APP_NAME_RE.fullmatch(name) or len(name) > 63:
        raise DeployError(
            f"app name {name!r}: expected lowercase letters, digits and '-', starting with a "
            "letter or digit, at most 63 characters, e.g. 'my-app'",
            "invalid_app_name",
        )
    return name


class Deployer:
    """Turns deploy requests into revisions; one deploy per app at a time."""

    def __init__(
        self, *, store: Store, blobs: BlobStore, builder: _Builder, fleet: _Fleet,
        check_gpus: Callable[[list[str], int], None], bundles_dir: Path,
        logs: Any = None, prewarm: Callable[[Path], Awaitable[None]] | None = None,
        images: _Images | None = None,
    ) -> None:  # fmt: skip
        self._store = store
        self._blobs = blobs
        self._builder = builder
        self._fleet = fleet
        self._check_gpus = check_gpus
        self._bundles = Path(bundles_dir)
        self._logs = logs  # a LogHub: build output is kept with the app's logs
        # Starts the env's zygote while the revision is committed, so even the first
        # request's cold start forks a pre-imported runner.
        self._prewarm = prewarm
        self._images = images  # apps with an image (all of them with --runtime docker)
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    # validation

    def plan(self, owner: str, request: dict[str, Any]) -> DeployPlan:
        """Check ``request`` (the POST body) completely; raise ``DeployError`` if unfit."""
        manifest = request.get("manifest")
        if not isinstance(manifest, dict):
            raise DeployError("request field 'manifest': expected the bundle manifest object")
        _check_manifest(manifest)
        name = check_app_name(request.get("app_name") or manifest["app_name"])
        options = manifest["options"]
        auth = request.get("auth") or options.get("auth") or "private"
        if auth not in AUTH_MODES:
            raise DeployError(f"auth {auth!r}: expected one of {', '.join(AUTH_MODES)}")
        strategy = request.get("strategy") or options.get("deployment_strategy") or "recreate"
        if strategy not in _STRATEGIES:
            raise DeployError(f"strategy {strategy!r}: expected one of {', '.join(_STRATEGIES)}")
        self._check_blobs(manifest)
        self._check_machine(options)
        self._check_conflict(owner, name, bool(request.get("ephemeral")))
        return DeployPlan(
            owner, name, manifest, auth, bool(request.get("ephemeral")), strategy,
            str(request.get("message") or ""), bool(request.get("no_cache")),
            bool(request.get("reset_scale") or options.get("app_scale_settings")),
        )  # fmt: skip

    def _check_blobs(self, manifest: dict[str, Any]) -> None:
        wanted = [manifest["payload"], *manifest["files"].values()]
        for layer in manifest["requirements"]:
            wanted += [blob[0] for req in layer if (blob := parse_blob_requirement(req))]
        missing = self._blobs.missing(wanted)
        if missing:
            raise DeployError(
                f"{len(missing)} blob(s) not uploaded: {', '.join(missing)}; upload them with "
                "POST /v1/blobs (the CLI does this) and deploy again",
                "missing_blobs",
            )

    def _check_machine(self, options: dict[str, Any]) -> None:
        machine_types = options.get("machine_type") or ["CPU"]
        if isinstance(machine_types, str):
            machine_types = [machine_types]
        try:
            self._check_gpus(list(machine_types), int(options.get("num_gpus") or 0))
        except Exception as exc:  # the GPU checker raises only user-facing errors
            raise DeployError(str(exc), "invalid_machine_type") from exc

    def _check_conflict(self, owner: str, name: str, ephemeral: bool) -> None:
        existing = self._store.get_app(owner, name)
        if ephemeral and existing is not None and not existing.ephemeral:
            raise DeployError(
                f"app {owner}/{name} is deployed; `fal run` under the same name would replace "
                "it and delete it on exit: run it under another name (--app-name) or "
                f"delete the deployed app first (fal apps delete {name})",
                "app_conflict",
                409,
            )

    # the deploy itself

    async def run(self, plan: DeployPlan, base_url: str) -> AsyncIterator[dict[str, Any]]:
        """Stream the deploy's events; the last one is ``done`` or ``error``.

        The work runs in its own task feeding a queue, so uv's output reaches the client
        while uv still runs; if the client goes away the task is cancelled.
        """
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        task = asyncio.create_task(self._guarded(plan, base_url, queue.put_nowait))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _guarded(self, plan: DeployPlan, base_url: str, emit: _Emit) -> None:
        lock = self._locks.setdefault((plan.owner, plan.app_name), asyncio.Lock())
        try:
            async with lock:
                await self._deploy(plan, base_url, emit)
        except Exception as exc:  # expected failures are events already; this is a bug
            _log.exception("deploy of %s/%s failed", plan.owner, plan.app_name)
            emit(_error("internal_error", f"{type(exc).__name__}: {exc}"))

    async def _deploy(self, plan: DeployPlan, base_url: str, emit: _Emit) -> None:
        emit({"event": "stage", "stage": "build"})
        started = time.monotonic()
        try:
            workdir = await asyncio.to_thread(self._materialise, plan.manifest)
            built = await self._build(plan, emit)
        except BlobError as exc:
            return emit(_error("invalid_manifest", str(exc)))
        except BuildError as exc:
            return emit(_error("build_failed", _build_failure(exc)))
        except ImageBuildError as exc:
            return emit(_error("build_failed", _image_failure(exc)))
        except EngineUnavailable as exc:
            return emit(_error("engine_unavailable", str(exc)))
        _log.info("built %s/%s in %.2fs", plan.owner, plan.app_name, time.monotonic() - started)
        app, revision = self._commit(plan, built, workdir)
        # The revision is live now: the fleet must hear of it even if the client goes away.
        await asyncio.shield(self._fleet.revision_changed(app, plan.strategy))
        if plan.ephemeral:
            emit({"event": "stage", "stage": "start"})
            try:
                await self._fleet.ensure_runner(app, revision)
            except RunnerStartError as exc:
                return emit(_error("setup_failed", exc.detail or str(exc)))
        emit({"event": "stage", "stage": "ready"})
        emit(self._done(app, revision, base_url))

    async def _build(self, plan: DeployPlan, emit: _Emit) -> _Built:
        """The app's image when it runs in one, else its uv env (and a prewarmed zygote)."""
        log = self._build_log(plan, emit)
        if self._images is not None and self._images.wanted(plan.manifest):
            tag = await self._images.ensure_image(plan.manifest, no_cache=plan.no_cache, log=log)
            return _Built(env_key=tag, python="", image=tag)
        env: Env = await self._builder.ensure(
            plan.manifest["python"], plan.manifest["requirements"], no_cache=plan.no_cache,
            log=log,
        )  # fmt: skip
        if self._prewarm is not None:
            await self._prewarm(env.python)
        return _Built(env.key, str(env.python))

    def _materialise(self, manifest: dict[str, Any]) -> Path:
        files: dict[str, str] = manifest["files"]
        tree = hashlib.sha256(canonical_json(files)).hexdigest()
        return self._blobs.materialise(files, self._bundles / tree)

    def _build_log(self, plan: DeployPlan, emit: _Emit) -> Callable[[str], None]:
        def log(line: str) -> None:
            emit({"event": "log", "source": "build", "message": line})
            if self._logs is not None:
                self._logs.emit(_build_record(plan, line))

        return log

    def _commit(
        self, plan: DeployPlan, built: _Built, workdir: Path
    ) -> tuple[AppRecord, RevisionRecord]:
        manifest = plan.manifest
        revision = RevisionRecord(
            id=new_revision_id(), owner=plan.owner, app=plan.app_name,
            bundle_hash=manifest["hash"], manifest=manifest, env_key=built.env_key,
            python=built.python, workdir=str(workdir),
            payload=str(self._blobs.path(manifest["payload"])), message=plan.message,
            created_at=time.time(), image=built.image,
        )  # fmt: skip
        scale = self._scale_for(plan)
        app = AppRecord(plan.owner, plan.app_name, plan.auth, plan.ephemeral, None, scale)
        return self._store.commit_revision(app, revision), revision

    def _scale_for(self, plan: DeployPlan) -> dict[str, Any]:
        """The new options' scale settings, unless the live ones were tuned since.

        fal keeps runtime-tuned scale settings across deploys unless asked to reset them;
        settings still equal to the previous revision's options were never tuned.
        """
        wanted = _scale_of(plan.manifest)
        previous = self._store.resolve(plan.owner, plan.app_name)
        if previous is None or previous[1] is None or plan.reset_scale:
            return wanted
        app, rev = previous[0], previous[1]
        return wanted if app.scale == _scale_of(rev.manifest) else app.scale

    def _done(self, app: AppRecord, rev: RevisionRecord, base_url: str) -> dict[str, Any]:
        runners = len(self._fleet.list_runners(owner=app.owner, app=app.name))
        return {
            "event": "done",
            "app": app_view(app, base_url, runners),
            "revision": revision_view(rev),
            "urls": app_urls(base_url, app.owner, app.name),
        }


_Emit = Callable[[dict[str, Any]], None]


def _error(error_type: str, detail: str) -> dict[str, Any]:
    return {"event": "error", "error_type": error_type, "detail": detail}


def _scale_of(manifest: dict[str, Any]) -> dict[str, Any]:
    options = manifest.get("options", {})
    return {key: options[key] for key in SCALE_KEYS if key in options}


def _build_record(plan: DeployPlan, line: str) -> Any:
    from buildsvc.logs import LogRecord  # the hub is optional; so is its record type

    return LogRecord(time.time(), "INFO", "build", plan.owner, plan.app_name, None, None, line)


# manifest checks: the client is not trusted, every field is looked at


def _check_manifest(m: dict[str, Any]) -> None:
    if m.get("format") != FORMAT_VERSION:
        raise DeployError(
            f"manifest format {m.get('format')!r}: this service reads format "
            f"{FORMAT_VERSION}; upgrade falcli and the service to matching versions"
        )
    _check_types(m)
    if manifest_hash(m) != m["hash"]:
        raise DeployError(
            f"manifest hash {m['hash']!r} does not match its content ({manifest_hash(m)}): "
            "the manifest was changed after it was sealed; package the app again"
        )
    if m["kind"] not in ("app", "function"):
        raise DeployError(f"manifest kind {m['kind']!r}: expected 'app' or 'function'")
    if not _PYTHON_RE.fullmatch(m["python"]):
        raise DeployError(f"manifest python {m['python']!r}: expected 'major.minor', e.g. '3.11'")
    if not is_sha256(m["payload"]):
        raise DeployError(f"manifest payload {m['payload']!r}: expected a sha256 hex digest")
    _check_files(m["files"])
    _check_requirements(m["requirements"])
    _check_options(m["options"])


def _check_types(m: dict[str, Any]) -> None:
    expected = {
        "app_name": str, "kind": str, "python": str, "payload": str, "hash": str,
        "requirements": list, "files": dict, "options": dict, "openapi": dict,
    }  # fmt: skip
    for field, kind in expected.items():
        if not isinstance(m.get(field), kind):
            raise DeployError(
                f"manifest field {field!r} = {m.get(field)!r:.80}: expected a {kind.__name__}; "
                "package the app again with a matching falcli"
            )


def _check_files(files: dict[str, Any]) -> None:
    for rel, sha in files.items():
        try:
            check_relpath(rel)
        except BlobError as exc:
            raise DeployError(f"manifest files: {exc}") from exc
        if not is_sha256(sha):
            raise DeployError(f"manifest files[{rel!r}] = {sha!r}: expected a sha256 hex digest")


def _check_requirements(layers: list[Any]) -> None:
    for layer in layers:
        if not isinstance(layer, list) or not all(isinstance(r, str) and r for r in layer):
            raise DeployError(
                f"manifest requirements layer {layer!r:.80}: expected a list of requirement "
                "strings, e.g. [['numpy==2.1.0']]"
            )
        for req in layer:
            blob = parse_blob_requirement(req)
            if blob and (not is_sha256(blob[0]) or not _SDIST_NAME_RE.fullmatch(blob[1])):
                raise DeployError(
                    f"requirement {req!r}: expected '/blob:<sha256>:<sdist file name>[extra]'"
                )


def _check_options(options: dict[str, Any]) -> None:
    for name, low in _INT_OPTIONS.items():
        value = options.get(name)
        if value is not None and (type(value) is not int or value < low):
            raise DeployError(f"option {name} = {value!r}: expected an integer >= {low}")
    for name in _POSITIVE_OPTIONS:
        value = options.get(name)
        if value is not None and (type(value) not in (int, float) or value <= 0):
            raise DeployError(f"option {name} = {value!r}: expected a number of seconds > 0")
    machine = options.get("machine_type")
    if machine is not None and not (
        isinstance(machine, str)
        or (isinstance(machine, list) and machine and all(isinstance(x, str) for x in machine))
    ):
        raise DeployError(
            f"option machine_type = {machine!r}: expected a name or a list of names, "
            "e.g. 'GPU-H100' or ['GPU-H100', 'GPU-A100']"
        )


def _image_failure(exc: ImageBuildError) -> str:
    """Our explanation, the failing step, then that step's output."""
    parts = [str(exc).strip()]
    if exc.step:
        parts.append(f"failing step: {exc.step}")
    if exc.detail.strip():
        parts.append(exc.detail.strip())
    return "\n".join(parts)


def _build_failure(exc: BuildError) -> str:
    """Our explanation (what failed, the fix) followed by uv's own words."""
    detail = (exc.detail or "").strip()
    summary = str(exc).strip()
    if not detail or detail in summary:
        return summary
    return f"{summary}\n{detail}"
