"""A persistent cache of file sha256 digests, so warm packaging does not re-read every file.

An entry is keyed by the file's absolute path and trusted only while its (size, mtime_ns,
inode) still match. Like git's index, a file whose mtime is within ``_RACY_WINDOW_NS`` of the
moment it was hashed is not cached: a same-size write in the same clock tick would otherwise
leave a stale digest behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

__all__ = ["HashCache", "default_cache_dir", "sha256_bytes"]

_CACHE_FILE = "file-hashes.json"
_RACY_WINDOW_NS = 2_000_000_000
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/falcli``, else ``~/.cache/falcli``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "falcli"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class HashCache:
    """sha256 of files, remembered across runs in ``cache_dir/file-hashes.json``."""

    def __init__(self, cache_dir: Path | None) -> None:
        self._file = (cache_dir or default_cache_dir()) / _CACHE_FILE
        self._entries: dict[str, list[int | str]] = self._load()
        self._dirty = False
        self.hits = 0
        self.misses = 0

    def _load(self) -> dict[str, list[int | str]]:
        try:
            data = json.loads(self._file.read_text())
        except (OSError, ValueError):
            # A missing or corrupt cache only costs a re-hash.
            return {}
        return data if isinstance(data, dict) else {}

    def sha256(self, path: Path) -> str:
        """The file's digest, from the cache when its stat is unchanged."""
        key = str(path.absolute())
        st = path.stat()
        stamp: list[int | str] = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = self._entries.get(key)
        if entry is not None and entry[:3] == stamp:
            self.hits += 1
            return str(entry[3])
        self.misses += 1
        digest = _sha256_file(path)
        if time.time_ns() - st.st_mtime_ns > _RACY_WINDOW_NS:
            self._entries[key] = [*stamp, digest]
            self._dirty = True
        return digest

    def save(self) -> None:
        """Write the cache atomically; failures are ignored (the cache is an optimisation)."""
        if not self._dirty:
            return
        try:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self._file.parent, prefix=".hashes-")
        except OSError:
            return
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self._entries, fh, separators=(",", ":"))
            os.replace(tmp, self._file)
            self._dirty = False
        except OSError:
            Path(tmp).unlink(missing_ok=True)
