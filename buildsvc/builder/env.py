"""uv virtualenvs for apps, content-addressed by Python version + requirement layers.

An env lives at ``<root>/envs/<key>`` and is usable once its completion marker exists (written
last). Builds of one key are serialised by an asyncio lock (this process) and an fcntl lock
(other service processes). A failed build leaves nothing behind.

Besides the app's requirements every env gets the *agent layer* (``builder.agentlayer``): the
runner's own dependencies pinned to the versions this service runs, and a ``.pth`` file pointing at
``<root>/agentlib/<falcli version>/``, a directory of symlinks to our ``fal``, ``falcli`` and
``buildsvc`` packages. That makes ``python -m buildsvc.runtime.agent`` work inside the env
without exposing the service's site-packages (and its secrets-bearing dependencies) to apps.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from buildsvc.builder.agentlayer import agent_pins, package_dirs
from falcli.packaging.manifest import parse_blob_requirement

__all__ = ["BuildError", "Env", "EnvBuilder", "UvRunner", "run_uv"]


# Bump when the env layout changes so old envs are not reused.
_LAYOUT_VERSION = 1
_MARKER = ".fal-env-complete"
# Only these variables reach uv (and the sdist build backends it runs, which execute user
# code): never the service's environment wholesale, it may hold secrets.
_UV_ENV_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "XDG_CACHE_HOME", "SSL_CERT_FILE",
                "SSL_CERT_DIR", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy",
                "https_proxy", "no_proxy")
_REQ_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_LOCK_POLL_S = 0.05

LogFn = Callable[[str], None]
UvRunner = Callable[[list[str], dict[str, str], LogFn], Awaitable[tuple[int, str]]]


def _no_log(line: str) -> None:
    return None


@dataclass(frozen=True)
class Env:
    key: str
    path: Path
    python: Path  # path/bin/python: run it by this path so the venv is active


class BuildError(Exception):
    """An env could not be built. ``detail`` is uv's own output, verbatim."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


async def run_uv(argv: list[str], env: dict[str, str], log: LogFn) -> tuple[int, str]:
    """Run uv, passing each output line to ``log`` as it arrives; return (code, output)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    async for raw in proc.stdout:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        lines.append(line)
        log(line)
    return await proc.wait(), "\n".join(lines)


def _requirement_name(req: str) -> str:
    match = _REQ_NAME.match(req)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else ""


class EnvBuilder:
    """Builds and caches app environments under ``root``.

    ``blob_path(sha)`` gives the stored file of an uploaded blob; ``runner`` is the seam that
    runs uv (tests count invocations through it).
    """

    def __init__(self, root: Path, *, blob_path: Callable[[str], Path], uv: str | None = None,
                 runner: UvRunner = run_uv) -> None:
        self._root = Path(root).absolute()
        self._blob_path = blob_path
        self._uv = uv or _find_uv()
        self._run = runner
        self._pins = agent_pins()
        self._falcli_version = importlib.metadata.version("falcli")
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                               dict[str, asyncio.Lock]]
        self._locks = weakref.WeakKeyDictionary()

    def key_for(self, python: str, layers: list[list[str]]) -> str:
        """The content address of an env: Python, requirements and the agent layer."""
        base = sys.version if python == _own_python() else python
        body = {"layout": _LAYOUT_VERSION, "python": python, "base": base, "layers": layers,
                "agent": self._pins, "falcli": self._falcli_version}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    def env_for(self, key: str) -> Env:
        path = self._root / "envs" / key
        return Env(key=key, path=path, python=path / "bin" / "python")

    async def ensure(self, python: str, layers: list[list[str]], *, no_cache: bool = False,
                     log: LogFn = _no_log) -> Env:
        """Return the env for these inputs, building it first if it is not complete."""
        env = self.env_for(self.key_for(python, layers))
        if not no_cache and (env.path / _MARKER).exists():
            self._agentlib()  # the .pth points there: keep it in place (cheap when it is)
            return env
        async with self._key_lock(env.key), _file_lock(self._root / "locks" / env.key):
            if no_cache or not (env.path / _MARKER).exists():
                await self._build(env, python, layers, no_cache=no_cache, log=log)
        return env

    def _key_lock(self, key: str) -> asyncio.Lock:
        per_loop = self._locks.setdefault(asyncio.get_running_loop(), {})
        return per_loop.setdefault(key, asyncio.Lock())

    async def _build(self, env: Env, python: str, layers: list[list[str]], *, no_cache: bool,
                     log: LogFn) -> None:
        shutil.rmtree(env.path, ignore_errors=True)  # a crashed build's leftovers
        try:
            requirements = self._requirements(layers, log)
            await self._uv_venv(env, python, no_cache, log)
            await self._uv_install(env, requirements, no_cache, log)
            _write_pth(env, self._agentlib())
            (env.path / _MARKER).write_text(env.key)
        except BaseException:
            shutil.rmtree(env.path, ignore_errors=True)
            raise

    def _requirements(self, layers: list[list[str]], log: LogFn) -> list[str]:
        # Layers matter for image builds; a venv installs them in one resolution.
        reqs = list(self._pins)
        for req in (r for layer in layers for r in layer):
            if _requirement_name(req) == "fal" and parse_blob_requirement(req) is None:
                log(f"skipping requirement {req!r}: `import fal` is provided by the platform")
                continue
            reqs.append(self._local_blob(req))
        return reqs

    def _local_blob(self, req: str) -> str:
        parsed = parse_blob_requirement(req)
        if parsed is None:
            return req
        sha, filename, extras = parsed
        if not filename or "/" in filename or filename.startswith("."):
            raise BuildError(f"requirement {req!r}: bad sdist file name {filename!r}; "
                             "expected /blob:<sha256>:<name>-<version>.tar.gz[extra]")
        # uv reads the package name from the file name, so the blob needs its real name.
        target = self._root / "sdists" / sha / filename
        if not target.exists():
            source = self._blob_path(sha)
            if not source.is_file():
                raise BuildError(f"requirement {req!r}: blob {sha} is not in the blob store; "
                                 "upload the bundle again (fal deploy uploads missing blobs)")
            _link_or_copy(source, target)
        return f"{target}{extras}"

    async def _uv_venv(self, env: Env, python: str, no_cache: bool, log: LogFn) -> None:
        base = sys.executable if python == _own_python() else python
        argv = [self._uv, "venv", "--python", base, "--no-python-downloads", "--no-config"]
        code, output = await self._run(argv + _cache_flags(no_cache) + [str(env.path)],
                                       _uv_env(), log)
        if code == 0:
            return
        if base == python:
            raise BuildError(
                f"python = {python!r}: this server has no Python {python} and downloads are "
                f"disabled; install Python {python} on the server, or deploy from Python "
                f"{_own_python()} (the server's own version)", detail=output)
        raise BuildError(f"creating the virtualenv for Python {python} failed", detail=output)

    async def _uv_install(self, env: Env, reqs: list[str], no_cache: bool, log: LogFn) -> None:
        # Compiling now costs ~1 s once per env; not compiling costs every runner that starts
        # before the first one has written its .pyc files ~0.6 s of cold start (measured).
        argv = [self._uv, "pip", "install", "--python", str(env.python), "--no-config",
                "--compile-bytecode"]
        code, output = await self._run(argv + _cache_flags(no_cache) + reqs, _uv_env(), log)
        if code != 0:
            raise BuildError("installing the requirements failed (uv's message below); fix "
                             "or remove the requirement it names", detail=output)

    def _agentlib(self) -> Path:
        """``<root>/agentlib/<version>/``: symlinks to our packages, created once, atomically."""
        lib = self._root / "agentlib" / self._falcli_version
        dirs = package_dirs()
        if all((lib / n).resolve() == d for n, d in dirs.items()):
            return lib
        lib.mkdir(parents=True, exist_ok=True)
        for name, target in dirs.items():
            tmp = lib / f".{name}.{os.getpid()}.tmp"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target, target_is_directory=True)
            os.replace(tmp, lib / name)
        return lib


def _find_uv() -> str:
    found = shutil.which("uv")
    if found:
        return found
    import uv  # the PyPI wheel ships the binary

    return uv.find_uv_bin()


def _own_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _cache_flags(no_cache: bool) -> list[str]:
    return ["--refresh", "--no-progress"] if no_cache else ["--no-progress"]


def _uv_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _UV_ENV_KEEP or k.startswith("UV_")}
    env["NO_COLOR"] = "1"
    return env


def _write_pth(env: Env, agentlib: Path) -> None:
    site = next(env.path.glob("lib/python*/site-packages"), None)
    if site is None:
        raise BuildError(f"virtualenv at {env.path} has no lib/python*/site-packages; "
                         "remove the directory and deploy again")
    (site / "_fal_agent.pth").write_text(f"{agentlib}\n")


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


@contextlib.asynccontextmanager
async def _file_lock(path: Path) -> AsyncIterator[None]:
    """An fcntl lock shared with other service processes; polled so it stays cancellable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(_LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # closing releases the lock
