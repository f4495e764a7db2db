"""The content-addressed blob store and the only way files get into it or out of it.

Blobs live at ``<root>/ab/abcdef...`` (sha256 hex, sharded by its first two digits), are
written through a temp file and an atomic rename after their hash is checked, and are made
read-only: ``materialise`` hard-links them into bundle trees, and a runner writing to one of
those files must not be able to change the stored blob for everyone else.

Uploads come as tar streams (optionally gzip) whose members are regular files named by their
own sha256. Anything else (absolute or ``..`` names, links, devices, directories, a name that
is not the content's hash, too many members or bytes) is refused with a ``BlobError``.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import IO

__all__ = ["BlobError", "BlobStore", "check_relpath", "is_sha256"]

_SHA_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1024 * 1024


class BlobError(ValueError):
    """An upload or a file map is unsafe or inconsistent; the API answers 400."""


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and _SHA_RE.fullmatch(value) is not None


def check_relpath(relpath: str) -> PurePosixPath:
    """Return ``relpath`` as a path if it stays inside its tree, else raise ``BlobError``."""
    fix = "use a POSIX path relative to the project root, e.g. 'src/app.py'"
    if not relpath or "\x00" in relpath:
        raise BlobError(f"file path {relpath!r} is empty or holds a NUL byte: {fix}")
    if "\\" in relpath:
        raise BlobError(f"file path {relpath!r} contains a backslash: {fix}")
    path = PurePosixPath(relpath)
    if path.is_absolute():
        raise BlobError(f"file path {relpath!r} is absolute: {fix}")
    if any(part in ("..", ".") for part in relpath.split("/")) or "//" in relpath:
        raise BlobError(f"file path {relpath!r} has '..', '.' or empty parts: {fix}")
    return path


class BlobStore:
    """Blobs under ``root``; upload caps bound what one ``extract_tar`` call accepts."""

    def __init__(
        self, root: Path, *, max_bytes: int = 10 * 1024**3, max_members: int = 100_000
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_members = max_members

    def path(self, sha: str) -> Path:
        if not is_sha256(sha):
            raise BlobError(f"blob name {sha!r}: expected 64 lowercase hex digits (a sha256)")
        return self.root / sha[:2] / sha

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def missing(self, hashes: Iterable[str]) -> list[str]:
        """The hashes not stored yet, in order, without duplicates."""
        return [sha for sha in dict.fromkeys(hashes) if not self.has(sha)]

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.put_stream(sha, [data])
        return sha

    def put_stream(self, sha: str, chunks: Iterable[bytes]) -> Path:
        """Store ``chunks`` as blob ``sha``, checking the hash before it becomes visible."""
        dest = self.path(sha)
        if dest.is_file():  # content-addressed: same name, same bytes; drain nothing
            return dest
        dest.parent.mkdir(exist_ok=True)
        tmp = dest.with_name(f".{sha}.{secrets.token_hex(4)}.tmp")
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    f.write(chunk)
            if digest.hexdigest() != sha:
                raise BlobError(
                    f"blob {sha}: content hashes to {digest.hexdigest()}; name each tar member "
                    "by the sha256 of its own bytes"
                )
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def extract_tar(self, fileobj: IO[bytes]) -> list[str]:
        """Store every member of a tar (or tar.gz) stream; return their hashes in order."""
        stored: list[str] = []
        total = 0
        try:
            with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
                for member in tar:
                    self._check_member(member, len(stored))
                    total += member.size
                    if total > self.max_bytes:
                        raise BlobError(
                            f"upload exceeds {self.max_bytes} bytes at member {member.name}: "
                            "upload in several smaller batches"
                        )
                    source = tar.extractfile(member)
                    assert source is not None  # regular files always have content
                    self.put_stream(member.name, _chunks(source))
                    stored.append(member.name)
        except tarfile.TarError as exc:
            raise BlobError(
                f"upload is not a readable tar stream ({exc}): send a tar or tar.gz whose "
                "members are files named by their sha256"
            ) from exc
        return stored

    def _check_member(self, member: tarfile.TarInfo, count: int) -> None:
        name = member.name
        if count >= self.max_members:
            raise BlobError(
                f"upload has more than {self.max_members} members: upload in smaller batches"
            )
        kind = _bad_kind(member)
        if kind:
            raise BlobError(f"tar member {name!r} is a {kind}: only regular files are accepted")
        if name.startswith("/") or ".." in name.split("/"):
            raise BlobError(f"tar member {name!r} is an unsafe path: name it by its sha256 only")
        if not is_sha256(name):
            raise BlobError(
                f"tar member {name!r} is not named by a sha256: name each member by the "
                "64-hex sha256 of its content"
            )

    def materialise(self, files: Mapping[str, str], dest: Path) -> Path:
        """Lay ``files`` (relpath -> sha) out under ``dest``; reuse ``dest`` if it exists.

        ``dest`` is named by the bundle hash, so an existing tree has exactly this content.
        The tree is built beside it and renamed into place, so it is never seen half-made.
        """
        dest = Path(dest)
        if dest.is_dir():
            return dest
        checked = [(check_relpath(rel), sha) for rel, sha in files.items()]
        missing = self.missing(sha for _, sha in checked)
        if missing:
            raise BlobError(f"blobs not uploaded: {', '.join(missing)}; upload them first")
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
        try:
            tmp.mkdir(parents=True)
            for rel, sha in checked:
                _link_or_copy(self.path(sha), tmp.joinpath(*rel.parts))
            tmp.rename(dest)
        except OSError as exc:
            if dest.is_dir():  # a concurrent deploy of the same bundle won the race
                return dest
            raise BlobError(f"cannot lay out files under {dest}: {exc}") from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return dest


def _chunks(source: IO[bytes]) -> Iterator[bytes]:
    while chunk := source.read(_CHUNK):
        yield chunk


def _bad_kind(member: tarfile.TarInfo) -> str:
    if member.isreg():
        return ""
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hard link"
    if member.isdir():
        return "directory"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "fifo"
    return "special file"


def _link_or_copy(src: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, target)
    except OSError:  # another filesystem (EXDEV) or links not allowed: copy instead
        shutil.copyfile(src, target)
        os.chmod(target, 0o444)
