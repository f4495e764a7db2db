"""Build (and cache) an sdist of the user's project for requirements ``.`` / ``.[extra]``.

The cache key is a digest of the project's source tree (relative paths + file digests,
skipping VCS, virtualenv and build-output directories), so a warm run with no source change
reuses the sdist instead of spending seconds in an isolated build.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from falcli.errors import PackagingError
from falcli.packaging.hashcache import HashCache

__all__ = ["build_sdist", "is_self_requirement", "tree_digest"]

_SKIP_DIRS = frozenset(
    {".git", ".hg", ".svn", ".venv", "venv", "env", "__pycache__", "build", "dist",
     "node_modules", ".tox", ".nox", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
)  # fmt: skip
_BUILD_TIMEOUT_S = 600
_TAIL_LINES = 25


def is_self_requirement(req: str) -> tuple[bool, str]:
    """``(True, "[extra]")`` for ``.`` / ``.[extra]``; ``(False, "")`` otherwise."""
    req = req.strip()
    if req == ".":
        return True, ""
    if req.startswith(".[") and req.endswith("]"):
        return True, req[1:]
    return False, ""


def _skipped(name: str) -> bool:
    return name in _SKIP_DIRS or name.endswith(".egg-info")


def tree_digest(root: Path, hashes: HashCache) -> str:
    """A digest of every source file under ``root`` (names and contents)."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _skipped(d))
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file() or name.endswith((".pyc", ".pyo")):
                continue
            digest.update(f"{(rel_dir / name).as_posix()}\0{hashes.sha256(path)}\n".encode())
    return digest.hexdigest()


def build_sdist(root: Path, cache_dir: Path, hashes: HashCache) -> Path:
    """Path of an sdist of the project at ``root``, built with ``python -m build``."""
    if not (root / "pyproject.toml").exists() and not (root / "setup.py").exists():
        raise PackagingError(
            f"requirements: '.' asks to package the project at {root}, but it has no "
            f"pyproject.toml [project] table or setup.py: add one, or remove '.'"
        )
    slot = cache_dir / "sdists" / tree_digest(root, hashes)
    cached = sorted(slot.glob("*.tar.gz")) if slot.is_dir() else []
    if cached:
        return cached[0]
    return _build_into(root, slot)


def _build_into(root: Path, slot: Path) -> Path:
    slot.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=slot.parent, prefix=".build-") as tmp:
        out = Path(tmp) / "dist"
        _run_build(root, out)
        built = sorted(out.glob("*.tar.gz"))
        if len(built) != 1:
            raise PackagingError(f"building an sdist of {root} produced {built}, expected one")
        staged = Path(tmp) / "slot"
        staged.mkdir()
        shutil.move(str(built[0]), staged / built[0].name)
        try:
            os.replace(staged, slot)
        except OSError:
            # A concurrent run filled the slot first; its sdist is as good as ours.
            pass
    return sorted(slot.glob("*.tar.gz"))[0]


def _run_build(root: Path, out: Path) -> None:
    cmd = [sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(root)]
    if shutil.which("uv"):
        cmd[4:4] = ["--installer", "uv"]  # resolves the isolated build env in ~1 s, not ~10
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise PackagingError(
            f"building an sdist of {root} took over {_BUILD_TIMEOUT_S}s: check its build "
            f"backend (python -m build --sdist {root})"
        ) from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-_TAIL_LINES:])
        raise PackagingError(
            f"building an sdist of {root} for requirement '.' failed (exit {proc.returncode}); "
            f"fix the project's [build-system]/[project] tables and retry "
            f"(python -m build --sdist {root}):\n{tail}"
        )
