"""Container images for apps, built on a Docker engine and cached by content hash.

``ImageBuilder.ensure(manifest)`` returns the image a manifest runs in. The tag is
``fal-app:<hash>`` where the hash covers everything that goes in (base image id, the
Dockerfile, requirement layers, our agent's pins and sources, the payload and every file),
computed from the manifest's blob hashes alone: an unchanged app costs one image lookup and
never calls ``docker build``.

- Requirement apps: a generated Dockerfile (``builder.dockerfile``) built with docker-py's
  (classic) builder; each requirements layer is its own cached layer, code comes last.
- Dockerfile apps (``image`` option): the user's Dockerfile plus our agent layer, built by
  Debian's ``docker`` CLI with BuildKit, the only builder that keeps ``secrets`` out of every
  layer (docker-py's API is the classic builder). Secret values are also masked in logs.

Builds and containers use the host network (this engine runs without a bridge) and get the
host's CA bundle (the network intercepts TLS). Build output reaches ``log`` line by line; a
failed build raises ``ImageBuildError`` naming the failing step, with its output.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from buildsvc.builder import dockerfile as df
from buildsvc.builder.agentlayer import AGENT_DISTS, agent_pins, package_dirs
from buildsvc.runtime.gpus import is_gpu_machine_type
from falcli.packaging.manifest import parse_blob_requirement

__all__ = ["DEFAULT_CPU_BASE", "DEFAULT_GPU_BASE", "BuiltImage", "ImageBuildError",
           "ImageBuilder"]

DEFAULT_CPU_BASE = "fal-base-cpu:bookworm"
DEFAULT_GPU_BASE = "fal-base-gpu:bookworm"
_LAYOUT_VERSION = 1
_REPO = "fal-app"
_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
_DOCKER_CLI = "/usr/bin/docker"  # Debian's client: BuildKit built in, no buildx needed
_TAIL = 60
_BK_STEP = re.compile(r"^#(\d+) (\[.*)$")
_BK_LINE = re.compile(r"^#(\d+) ")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

LogFn = Callable[[str], None]


def _no_log(line: str) -> None:
    return None


class ImageBuildError(Exception):
    """An image could not be built; ``step`` is the failing step, ``detail`` its output."""

    def __init__(self, message: str, step: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.step = step
        self.detail = detail


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    image_id: str
    built: bool  # False: it already existed and no build ran


class ImageBuilder:
    """Builds app images on the engine behind ``client`` (a ``docker.DockerClient``).

    ``blob_path(sha)`` is the stored file of a blob; ``root`` holds build contexts (removed
    after each build). Base images are configurable; the GPU default is the CPU Debian base
    retagged by scripts/docker-setup.sh, since a CUDA runtime image cannot be pulled here.
    """

    def __init__(self, root: Path, *, client: Any, blob_path: Callable[[str], Path],
                 cpu_base: str = DEFAULT_CPU_BASE, gpu_base: str = DEFAULT_GPU_BASE,
                 docker_cli: str = _DOCKER_CLI, ca_bundle: Path = _CA_BUNDLE) -> None:
        self._root = Path(root).absolute()
        self._client = client
        self._blob_path = blob_path
        self._bases = {"cpu": cpu_base, "gpu": gpu_base}
        self._cli = docker_cli
        self._ca = ca_bundle
        self._pins = agent_pins(AGENT_DISTS)
        self._agent_digest = _tree_digest(package_dirs())
        self._locks: dict[str, asyncio.Lock] = {}
        self.build_calls: list[str] = []  # tags passed to a builder, in order (for tests/ops)

    @functools.cached_property
    def _uv_digest(self) -> str:
        return _file_digest(Path(_uv_binary()))

    def base_for(self, manifest: Mapping[str, Any]) -> str:
        types = list(manifest.get("options", {}).get("machine_type") or ["XS"])
        return self._bases["gpu" if is_gpu_machine_type(types[0]) else "cpu"]

    def tag_for(self, manifest: Mapping[str, Any]) -> str:
        """The content-addressed tag of the image this manifest needs."""
        base_id = self._image_id(self.base_for(manifest))
        body = {"layout": _LAYOUT_VERSION, "base": base_id, "python": manifest["python"],
                "requirements": manifest.get("requirements", []),
                "image": _hashed_image(manifest), "payload": manifest["payload"],
                "files": manifest.get("files", {}), "pins": self._pins,
                "agent": self._agent_digest, "ca": _file_digest(self._ca),
                "uv": self._uv_digest}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return f"{_REPO}:{hashlib.sha256(canonical.encode()).hexdigest()[:40]}"

    async def ensure(self, manifest: Mapping[str, Any], *, no_cache: bool = False,
                     log: LogFn = _no_log) -> BuiltImage:
        """The image for ``manifest``, building it only if no image has its tag."""
        tag = await asyncio.to_thread(self.tag_for, manifest)
        lock = self._locks.setdefault(tag, asyncio.Lock())
        async with lock:
            if not no_cache:
                existing = await asyncio.to_thread(self._image_id, tag, missing_ok=True)
                if existing:
                    return BuiltImage(tag, existing, built=False)
            self._warn_gpu_base(manifest, log)
            await self._build(manifest, tag, no_cache, _threadsafe(log))
            return BuiltImage(tag, await asyncio.to_thread(self._image_id, tag), built=True)

    def _warn_gpu_base(self, manifest: Mapping[str, Any], log: LogFn) -> None:
        base = self.base_for(manifest)
        if base == DEFAULT_GPU_BASE and base != self._bases["cpu"]:
            log(f"NOTE: GPU base image {base!r} is the CPU Debian base retagged (no CUDA "
                "runtime image can be pulled here); configure a CUDA base for real GPUs")

    async def _build(self, manifest: Mapping[str, Any], tag: str, no_cache: bool,
                     log: LogFn) -> None:
        self.build_calls.append(tag)
        context = Path(tempfile.mkdtemp(prefix="ctx-", dir=_mkdir(self._root / "contexts")))
        try:
            image = _image_option(manifest)
            if image is None:
                await asyncio.to_thread(self._stage_requirements, manifest, context)
                await asyncio.to_thread(self._build_classic, context, tag, no_cache, log)
            else:
                await asyncio.to_thread(self._stage_dockerfile, manifest, image, context)
                await self._build_cli(context, tag, image, no_cache, log)
        finally:
            await asyncio.to_thread(shutil.rmtree, context, True)

    # -- build contexts -------------------------------------------------------------------

    def _stage_common(self, manifest: Mapping[str, Any], ours: Path) -> None:
        _mkdir(ours)
        shutil.copyfile(self._ca, ours / "ca.crt")
        (ours / "agent-requirements.txt").write_text("\n".join(self._pins) + "\n")
        for name, source in package_dirs().items():
            shutil.copytree(source, ours / "agentlib" / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        _link(self._blob(manifest["payload"], "payload"), ours / "payload")

    def _stage_requirements(self, manifest: Mapping[str, Any], context: Path) -> None:
        ours = context / df.CONTEXT_DIR
        self._stage_common(manifest, ours)
        self._stage_files(manifest, context / "app")
        layers = [self._stage_layer(i, layer, ours)
                  for i, layer in enumerate(manifest.get("requirements", []))]
        python = f"/usr/bin/python{manifest['python']}"
        text = df.requirements_dockerfile(self.base_for(manifest), self._uv_image(), python,
                                          layers)
        (context / "Dockerfile").write_text(text)

    def _stage_layer(self, index: int, layer: list[str], ours: Path) -> df.ReqLayer:
        folder = _mkdir(ours / "reqs" / str(index))
        lines, sdists = [], []
        for req in layer:
            parsed = parse_blob_requirement(req)
            if parsed is None:
                if not _is_fal(req):  # `import fal` is provided by the platform
                    lines.append(req)
                continue
            sha, filename, extras = parsed
            if not filename or "/" in filename or filename.startswith("."):
                raise ImageBuildError(f"requirement {req!r}: bad sdist file name {filename!r};"
                                      " expected /blob:<sha256>:<name>-<version>.tar.gz")
            _link(self._blob(sha, req), folder / filename)
            sdists.append(f"{df.CONTEXT_DIR}/reqs/{index}/{filename}")
            lines.append(f"{df.AGENT_ROOT}/reqs/{index}/{filename}{extras}")
        (folder / "requirements.txt").write_text("".join(f"{line}\n" for line in lines))
        return df.ReqLayer(f"{df.CONTEXT_DIR}/reqs/{index}/requirements.txt", sdists)

    def _stage_dockerfile(self, manifest: Mapping[str, Any], image: Mapping[str, Any],
                          context: Path) -> None:
        files = manifest.get("files", {})
        clash = [p for p in files if p.split("/")[0] == df.CONTEXT_DIR]
        if clash:
            raise ImageBuildError(f"bundle file {clash[0]!r}: the {df.CONTEXT_DIR}/ folder is "
                                  "reserved for the build service; rename it")
        self._stage_files(manifest, context)
        ours = context / df.CONTEXT_DIR
        self._stage_common(manifest, ours)
        text = self._user_dockerfile_text(image, files)
        (ours / "Dockerfile").write_text(
            df.user_dockerfile(text, self._uv_image(), has_payload=True))

    def _uv_image(self) -> str:
        """``fal-uv:<digest>``, a scratch image with our uv binary, built once per binary."""
        binary = Path(_uv_binary())
        tag = f"fal-uv:{self._uv_digest[:16]}"
        if self._image_id(tag, missing_ok=True):
            return tag
        with tempfile.TemporaryDirectory(dir=_mkdir(self._root / "contexts")) as context:
            _link(binary, Path(context) / "uv")
            (Path(context) / "Dockerfile").write_text(df.uv_image_dockerfile())
            _follow_classic(self._client.api.build(path=context, tag=tag, rm=True,
                                                   decode=True), _no_log)
        return tag

    def _user_dockerfile_text(self, image: Mapping[str, Any], files: Mapping[str, str]) -> str:
        if image.get("dockerfile_str"):
            return str(image["dockerfile_str"])
        path = str(image.get("dockerfile") or "")
        if path not in files:
            raise ImageBuildError(
                f"image.dockerfile = {path!r}: that file is not in the uploaded bundle; put "
                "the Dockerfile inside the project, or use ContainerImage.from_dockerfile()")
        return self._blob(files[path], path).read_text(encoding="utf-8")

    def _stage_files(self, manifest: Mapping[str, Any], dest: Path) -> None:
        _mkdir(dest)
        for relpath, sha in sorted(manifest.get("files", {}).items()):
            _link(self._blob(sha, relpath), dest / relpath)

    def _blob(self, sha: str, what: str) -> Path:
        path = self._blob_path(sha)
        if not path.is_file():
            raise ImageBuildError(f"{what}: blob {sha} is not in the blob store; deploy "
                                  "again (the CLI uploads missing blobs)")
        return path

    # -- builders ----------------------------------------------------------------------

    def _build_classic(self, context: Path, tag: str, no_cache: bool, log: LogFn) -> None:
        stream = self._client.api.build(
            path=str(context), tag=tag, nocache=no_cache, rm=True, forcerm=True,
            network_mode="host", decode=True)
        _follow_classic(stream, log)

    async def _build_cli(self, context: Path, tag: str, image: Mapping[str, Any],
                         no_cache: bool, log: LogFn) -> None:
        secrets: dict[str, str] = dict(image.get("secrets") or {})
        with tempfile.TemporaryDirectory(dir=_mkdir(self._root / "private")) as private:
            argv, env = self._cli_args(context, tag, image, Path(private), no_cache)
            masked = _masker(secrets.values(), log)
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            assert proc.stdout is not None
            tracker = _BuildKitSteps()
            async for raw in proc.stdout:
                line = masked(raw.decode("utf-8", "replace").rstrip("\n"))
                tracker.feed(line)
            if await proc.wait() != 0:
                raise tracker.error()

    def _cli_args(self, context: Path, tag: str, image: Mapping[str, Any], private: Path,
                  no_cache: bool) -> tuple[list[str], dict[str, str]]:
        argv = [self._cli, "build", "--progress=plain", "--network", "host", "-t", tag,
                "-f", str(context / df.CONTEXT_DIR / "Dockerfile")]
        argv += ["--no-cache"] if no_cache else []
        for key, value in sorted((image.get("build_args") or {}).items()):
            argv += ["--build-arg", f"{key}={value}"]
        for name, value in sorted((image.get("secrets") or {}).items()):
            secret = private / f"secret-{len(argv)}"
            secret.touch(mode=0o600)
            secret.write_text(value)
            argv += ["--secret", f"id={name},src={secret}"]
        _write_registry_auth(private, image.get("registries") or {})
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_HOST")}
        env.update(DOCKER_BUILDKIT="1", DOCKER_CONFIG=str(private))
        return argv + [str(context)], env

    def _image_id(self, ref: str, missing_ok: bool = False) -> str:
        import docker.errors

        try:
            return str(self._client.images.get(ref).id)
        except docker.errors.ImageNotFound:
            if missing_ok:
                return ""
            raise ImageBuildError(
                f"image {ref!r} is not on this Docker engine; run scripts/docker-setup.sh to "
                "build the base images, or configure another base") from None


class _BuildKitSteps:
    """Follows ``--progress=plain`` output to name the failing step and keep its output."""

    def __init__(self) -> None:
        self._steps: dict[str, str] = {}
        self._output: dict[str, list[str]] = {}
        self._tail: list[str] = []

    def feed(self, line: str) -> None:
        self._tail = (self._tail + [line])[-_TAIL:]
        step = _BK_STEP.match(line)
        if step and step.group(1) not in self._steps:
            self._steps[step.group(1)] = step.group(2)
        number = _BK_LINE.match(line)
        if number:
            self._output.setdefault(number.group(1), []).append(line)

    def error(self) -> ImageBuildError:
        failed = next((n for n, lines in self._output.items()
                       if any(" ERROR" in ln or "ERROR:" in ln for ln in lines)), "")
        step = self._steps.get(failed, "")
        detail = "\n".join(self._output.get(failed, self._tail)[-_TAIL:])
        where = f"at step {step}" if step else "(see the build output)"
        return ImageBuildError(f"image build failed {where}; fix that step of the Dockerfile "
                               "and deploy again", step=step, detail=detail)


def _follow_classic(stream: Iterable[dict[str, Any]], log: LogFn) -> None:
    """Log the classic builder's output as whole lines; raise on its error naming the step."""
    step, pending = "", ""
    output: list[str] = []
    for chunk in stream:
        if "error" in chunk:
            error = _ANSI.sub("", str(chunk["error"])).strip()
            log(error)
            raise ImageBuildError(f"image build failed at {step or 'the start'}: {error}; fix "
                                  "that step (its output is in the detail) and deploy again",
                                  step=step, detail="\n".join([*output[-_TAIL:], error]))
        # Chunks are not whole lines (stderr arrives in pieces, colour codes around them).
        pending += _ANSI.sub("", str(chunk.get("stream", "")))
        *lines, pending = pending.split("\n")
        for line in filter(str.strip, lines):
            if line.startswith("Step "):
                step, output = line, []
            else:
                output.append(line)
            log(line)


def _masker(secrets: Iterable[str], log: LogFn) -> Callable[[str], str]:
    values = sorted((s for s in secrets if s), key=len, reverse=True)

    def mask(line: str) -> str:
        for value in values:
            line = line.replace(value, "***")
        log(line)
        return line

    return mask


def _write_registry_auth(folder: Path, registries: Mapping[str, Mapping[str, str]]) -> None:
    # A private DOCKER_CONFIG for this build only: the credentials never touch ~/.docker.
    auths = {host: {"auth": base64.b64encode(
        f"{c['username']}:{c['password']}".encode()).decode()} for host, c in registries.items()}
    config = folder / "config.json"
    config.touch(mode=0o600)
    config.write_text(json.dumps({"auths": auths}))


def _image_option(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    image = manifest.get("options", {}).get("image")
    return dict(image) if image else None


def _hashed_image(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    image = _image_option(manifest)
    if image is None:
        return None
    # Secret values stay out of the tag (a hash of a short secret can be brute-forced).
    return {**image, "secrets": sorted(image.get("secrets") or {}),
            "registries": sorted(image.get("registries") or {})}


def _is_fal(req: str) -> bool:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*($|[<>=!~;\[ ])", req)
    return match is not None and match.group(1).lower() == "fal"


def _tree_digest(dirs: Mapping[str, Path]) -> str:
    digest = hashlib.sha256()
    for name, root in sorted(dirs.items()):
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                digest.update(f"{name}/{path.relative_to(root)}\0".encode())
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _uv_binary() -> str:
    try:
        import uv  # the PyPI wheel's binary; `which uv` may find a shell shim (pyenv)
    except ImportError:
        found = shutil.which("uv")
        if found is None:
            raise ImageBuildError(
                "uv is not installed on the build server; pip install uv") from None
        return found
    return str(uv.find_uv_bin())


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
        shutil.copymode(source, target)


def _threadsafe(log: LogFn) -> LogFn:
    """``log`` called from a build thread runs on the event loop's thread instead."""
    loop = asyncio.get_running_loop()

    def post(line: str) -> None:
        loop.call_soon_threadsafe(log, line)

    return post
