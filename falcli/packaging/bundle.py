"""Turn a resolved target into a Bundle: the sealed manifest and where each blob's bytes are.

Options follow one precedence, highest first: CLI flag (``overrides``) > value set
explicitly on the class / ``@fal.function`` (``__fal_options__``) > ``[tool.fal.apps]``
field > default. The app name: ``--app-name`` > class ``app_name`` > pyproject ``name`` >
the app key > the kebab-case class name. Everything in the manifest is derived from content
(no timestamps, no absolute paths), so the same inputs give the same ``hash``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from falcli.errors import PackagingError
from falcli.function import FalFunction
from falcli.naming import kebab_case
from falcli.options import ALIASES, MANIFEST_OPTIONS, resolve_options, validate_option
from falcli.packaging import files as _files
from falcli.packaging import pickling, sdist
from falcli.packaging.hashcache import HashCache, default_cache_dir, sha256_bytes
from falcli.packaging.manifest import FORMAT_VERSION, Manifest, blob_requirement, seal
from falcli.project import Target

__all__ = ["Bundle", "package"]

_LOCAL_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


@dataclass
class Bundle:
    """A sealed manifest plus its blobs: sha256 -> a file path or the bytes themselves."""

    manifest: Manifest
    blobs: dict[str, Path | bytes]


def package(
    target: Target, *, overrides: Mapping[str, Any] = {}, cache_dir: Path | None = None
) -> Bundle:
    """Package ``target`` into a Bundle; raise PackagingError / ConfigError with the fix."""
    cache = cache_dir or default_cache_dir()
    hashes = HashCache(cache)
    try:
        return _package(target, dict(overrides), cache, hashes)
    finally:
        hashes.save()


def _package(target: Target, overrides: dict[str, Any], cache: Path, hashes: HashCache) -> Bundle:
    obj = target.obj
    fields = dict(target.config.fields) if target.config else {}
    explicit = _canonical(getattr(obj, "__fal_options__", {}) or {})
    # None means "flag not given", so it never hides a lower-precedence value.
    given = {k: v for k, v in overrides.items() if v is not None}
    cli = _canonical({k: validate_option(k, v, where="command line") for k, v in given.items()})
    merged = {**_runtime_fields(fields), **explicit, **cli}
    _check_python(merged.get("python_version"))
    blobs: dict[str, Path | bytes] = {}
    options = resolve_options(
        {k: v for k, v in merged.items() if k in MANIFEST_OPTIONS}, where=_where(target)
    )
    collected = _collect_files(target, fields, options, hashes)
    blobs.update(collected.blobs)
    requirements = _requirements(merged.get("requirements", []), target, cache, hashes, blobs)
    payload = _payload(target, merged.get("local_python_modules", []))
    payload_sha = sha256_bytes(payload)
    blobs[payload_sha] = payload
    app_name = _app_name(target, cli, explicit, fields)
    manifest = {
        "format": FORMAT_VERSION,
        "app_name": app_name,
        "kind": "function" if isinstance(obj, FalFunction) else "app",
        "python": _LOCAL_PYTHON,
        "payload": payload_sha,
        "requirements": requirements,
        "files": collected.files,
        "options": options,
        "openapi": _openapi(obj, app_name),
    }
    return Bundle(manifest=seal(manifest), blobs=blobs)


def _canonical(options: Mapping[str, Any]) -> dict[str, Any]:
    """Alias names made canonical, ``host_kwargs`` flattened (direct values win)."""
    flat: dict[str, Any] = dict(options.get("host_kwargs") or {})
    for name, value in options.items():
        if name != "host_kwargs":
            flat[ALIASES.get(name, name)] = value
    return {ALIASES.get(k, k): v for k, v in flat.items()}


def _runtime_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    from falcli.project import RUNTIME_FIELDS

    return {k: v for k, v in fields.items() if k in RUNTIME_FIELDS}


def _where(target: Target) -> str:
    if target.app_key:
        return f"[tool.fal.apps.{target.app_key}]"
    return f"app {getattr(target.obj, '__qualname__', target.obj)!r}"


def _check_python(wanted: object) -> None:
    if wanted is not None and wanted != _LOCAL_PYTHON:
        raise PackagingError(
            f"python_version = {wanted!r}, but this interpreter is Python {_LOCAL_PYTHON}: the "
            "app is pickled here and must be unpickled by the same minor version. Run fal "
            f"from a Python {wanted} environment, or set python_version = {_LOCAL_PYTHON!r}"
        )


def _app_name(
    target: Target, cli: Mapping[str, Any], explicit: Mapping[str, Any], fields: Mapping[str, Any]
) -> str:
    for candidate in (cli.get("app_name"), explicit.get("app_name"), fields.get("name")):
        if candidate:
            return str(candidate)
    if target.app_key:
        return str(validate_option("app_name", target.app_key, where=_where(target)))
    return kebab_case(getattr(target.obj, "__name__", "app"))


def _openapi(obj: object, app_name: str) -> dict[str, Any]:
    from falcli.endpoints import openapi_for

    document = openapi_for(obj)  # type: ignore[arg-type]
    if isinstance(document.get("info"), dict):
        document["info"] = {**document["info"], "title": app_name}
    return document


def _payload(target: Target, local_modules: list[str]) -> bytes:
    exclude: list[str] = []
    config = target.config
    if config is not None and config.python_entry_point:
        # The runner installs this package (requirements "." or the image): by reference.
        exclude.append(config.python_entry_point.split(".")[0].split(":")[0])
    modules = pickling.by_value_modules(target.root, local_modules, exclude=exclude)
    return pickling.dumps(target.obj, modules)


def _requirements(
    layers: list[list[str]], target: Target, cache: Path, hashes: HashCache,
    blobs: dict[str, Path | bytes],
) -> list[list[str]]:  # fmt: skip
    out: list[list[str]] = []
    for layer in layers:
        rewritten: list[str] = []
        for req in layer:
            is_self, extras = sdist.is_self_requirement(req)
            if not is_self:
                rewritten.append(req)
                continue
            built = sdist.build_sdist(target.root, cache, hashes)
            sha = hashes.sha256(built)
            blobs[sha] = built
            rewritten.append(blob_requirement(sha, built.name, extras))
        out.append(rewritten)
    return out


def _collect_files(
    target: Target, fields: Mapping[str, Any], options: dict[str, Any], hashes: HashCache
) -> _files.CollectedFiles:
    where = _where(target)
    context_dir = fields.get("app_files_context_dir")
    context = (target.root / context_dir) if context_dir else target.root
    ignore = [re.compile(p) for p in fields.get("app_files_ignore", [])]
    collected = _files.collect_files(
        fields.get("app_files", []), context=context, ignore=ignore, hashes=hashes,
        what=f"{where} app_files",
    )  # fmt: skip
    text = _dockerfile_text(target, options)
    if text is not None:
        sources = _files.dockerfile_sources(text)
        extra = _files.collect_files(
            sources, context=context, ignore=ignore, hashes=hashes,
            what=f"{where} Dockerfile COPY/ADD",
        )  # fmt: skip
        collected.files.update(extra.files)
        collected.blobs.update(extra.blobs)
    collected.files = dict(sorted(collected.files.items()))
    return collected


def _dockerfile_text(target: Target, options: dict[str, Any]) -> str | None:
    """The Dockerfile text; a path (pyproject ``image.dockerfile``) is inlined so that the
    manifest is self-contained and its hash covers the Dockerfile's content."""
    image = options.get("image")
    if not image:
        return None
    if image.get("dockerfile_str") is None and image.get("dockerfile"):
        path = target.root / image["dockerfile"]
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PackagingError(
                f"{_where(target)}: cannot read image.dockerfile {str(path)!r}: {exc.strerror}; "
                "fix the path (relative to the directory of pyproject.toml)"
            ) from None
        options["image"] = {**image, "dockerfile_str": text, "dockerfile": None}
    return str(options["image"]["dockerfile_str"])
