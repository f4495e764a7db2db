"""Collect the files that travel with an app: ``app_files`` and Dockerfile COPY/ADD sources.

Every collected path is made relative to the context directory and written in POSIX form.
Anything that would escape the context directory (``..``, absolute paths, symlinks pointing
outside) is refused, because the service materialises ``files`` as the runner's working tree.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from falcli.errors import PackagingError
from falcli.packaging.hashcache import HashCache

__all__ = ["DEFAULT_IGNORES", "CollectedFiles", "collect_files", "dockerfile_sources"]

# Never worth shipping; a user who needs one of these can rename it.
DEFAULT_IGNORES = (r"(^|/)__pycache__/", r"\.py[co]$", r"(^|/)\.git/", r"(^|/)\.DS_Store$")

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://|^git@", re.IGNORECASE)


@dataclass
class CollectedFiles:
    """``files`` for the manifest (relpath -> sha256) and where each blob's bytes are."""

    files: dict[str, str] = field(default_factory=dict)
    blobs: dict[str, Path] = field(default_factory=dict)


def collect_files(
    sources: Iterable[str],
    *,
    context: Path,
    ignore: Iterable[re.Pattern[str]],
    hashes: HashCache,
    what: str,
) -> CollectedFiles:
    """Hash every file named by ``sources`` (files, directories or globs) under ``context``.

    ``what`` names the config the sources came from, for error messages.
    """
    context = context.resolve()
    patterns = [re.compile(p) for p in DEFAULT_IGNORES] + list(ignore)
    out = CollectedFiles()
    for source in sources:
        for path in _expand(source, context, what):
            rel = _relpath(path, context, source, what)
            if any(p.search(rel) for p in patterns):
                continue
            digest = hashes.sha256(path)
            out.files[rel] = digest
            out.blobs[digest] = path
    return out


def _expand(source: str, context: Path, what: str) -> Iterator[Path]:
    """Yield the regular files named by one source entry."""
    if Path(source).is_absolute():
        raise PackagingError(
            f"{what}: {source!r} is an absolute path: app files must be relative to the "
            f"context directory {context}, e.g. {Path(source).name!r}"
        )
    if any(ch in source for ch in "*?["):
        matches = sorted(context.glob(source))
        if not matches:
            raise _missing(source, context, what)
        for match in matches:
            yield from _walk(match, context, source, what)
        return
    path = context / source
    if not path.exists() and not path.is_symlink():
        raise _missing(source, context, what)
    yield from _walk(path, context, source, what)


def _walk(path: Path, context: Path, source: str, what: str) -> Iterator[Path]:
    _check_inside(path, context, source, what)
    if not path.is_dir():
        yield path
        return
    seen: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        real = Path(dirpath).resolve()
        _check_inside(Path(dirpath), context, source, what)
        if real in seen:  # a symlink loop: walk each real directory once
            dirnames.clear()
            continue
        seen.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            file = Path(dirpath) / name
            _check_inside(file, context, source, what)
            yield file


def _check_inside(path: Path, context: Path, source: str, what: str) -> None:
    real = path.resolve()
    if real != context and context not in real.parents:
        raise PackagingError(
            f"{what}: {source!r} leads to {real}, which is outside the context directory "
            f"{context}: keep app files (and symlink targets) inside it, or set "
            f"app_files_context_dir to a directory that contains them"
        )


def _relpath(path: Path, context: Path, source: str, what: str) -> str:
    # Relative to the *unresolved* location, so a symlink keeps its own name in the tree.
    try:
        rel = Path(os.path.normpath(path.absolute())).relative_to(context)
    except ValueError:
        rel = path.resolve().relative_to(context)
    posix = rel.as_posix()
    if posix in ("", ".") or posix.startswith("../"):
        raise PackagingError(f"{what}: {source!r} names the context directory itself as a file")
    return posix


def _missing(source: str, context: Path, what: str) -> PackagingError:
    return PackagingError(
        f"{what}: {source!r} does not exist under {context}: fix the path (it is relative to "
        f"the context directory) or remove it"
    )


def dockerfile_sources(text: str) -> list[str]:
    """Local source paths of the COPY/ADD instructions in a Dockerfile.

    URLs, ``--from=<stage>`` copies and heredocs are skipped: they do not read the context.
    """
    sources: list[str] = []
    for instruction in _instructions(text):
        parts = instruction.split(None, 1)
        if len(parts) != 2 or parts[0].upper() not in ("COPY", "ADD"):
            continue
        flags, args = _split_args(parts[1])
        if any(f.startswith("--from") for f in flags):
            continue
        for src in args[:-1]:  # the last one is the destination
            if not _URL.match(src) and not src.startswith("<<"):
                sources.append(src.removeprefix("./") or ".")
    return sources


def _instructions(text: str) -> Iterator[str]:
    """Join continuation lines and drop comments."""
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        yield current + line
        current = ""
    if current:
        yield current


def _split_args(rest: str) -> tuple[list[str], list[str]]:
    """(flags, paths) of a COPY/ADD; paths in shell or JSON-array form."""
    flags: list[str] = []
    rest = rest.strip()
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        flags.append(flag)
        rest = rest.strip()
    if rest.startswith("["):
        try:
            parsed = json.loads(rest)
        except ValueError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(p, str) for p in parsed):
            return flags, parsed
    try:
        return flags, shlex.split(rest)
    except ValueError:
        return flags, rest.split()
