"""Blobs: ask which of a bundle's blobs the service lacks, upload those as one tar.

The tar is generated on the fly (header, file bytes read in chunks, padding) so a large
blob is streamed from disk, never held in memory whole.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from falcli.client._http import Session
from falcli.errors import PackagingError

__all__ = ["BlobSource", "Blobs", "iter_tar"]

BlobSource = Path | bytes
_BLOCK = tarfile.BLOCKSIZE  # 512
_CHUNK = 1 << 20


class Blobs:
    def __init__(self, session: Session) -> None:
        self._s = session

    def missing(self, hashes: list[str]) -> list[str]:
        """The subset of ``hashes`` the service does not hold yet."""
        if not hashes:
            return []
        body = self._s.request("POST", "/v1/blobs/missing", json_body={"hashes": hashes})
        return list(body.get("missing", []))

    def upload(self, blobs: Mapping[str, BlobSource]) -> list[str]:
        """Upload ``blobs`` (sha256 -> file or bytes) in one streamed tar; returns stored ones."""
        if not blobs:
            return []
        body = self._s.request(
            "POST",
            "/v1/blobs",
            content=iter_tar(blobs),
            headers={"Content-Type": "application/x-tar"},
        )
        return list(body.get("stored", []))


def iter_tar(blobs: Mapping[str, BlobSource]) -> Iterator[bytes]:
    """A ustar archive whose members are the blobs, each named by its sha256."""
    for sha, source in blobs.items():
        size = len(source) if isinstance(source, bytes) else _size(source)
        info = tarfile.TarInfo(name=sha)
        info.size = size
        info.mode = 0o644
        yield info.tobuf(format=tarfile.USTAR_FORMAT)
        yield from _content(sha, source, size)
        if size % _BLOCK:
            yield b"\0" * (_BLOCK - size % _BLOCK)
    yield b"\0" * (_BLOCK * 2)  # end-of-archive marker


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise PackagingError(
            f"blob file {path} cannot be read ({exc}): it changed while uploading; "
            "run the command again"
        ) from exc


def _content(sha: str, source: BlobSource, size: int) -> Iterator[bytes]:
    stream = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    sent = 0
    with stream:
        while chunk := stream.read(min(_CHUNK, size - sent)):
            sent += len(chunk)
            yield chunk
    if sent != size:
        raise PackagingError(
            f"blob {sha} ({source if isinstance(source, Path) else 'in memory'}) changed size "
            f"while uploading ({size} -> {sent} bytes): run the command again"
        )
