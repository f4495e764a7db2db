"""BlobStore: hash-checked writes, every unsafe tar refused, safe materialisation."""

from __future__ import annotations

import gzip
import hashlib
import io
import stat
import tarfile
from pathlib import Path

import pytest

from buildsvc.blobs import BlobError, BlobStore


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tar(members: list[tarfile.TarInfo | tuple[str, bytes]], gz: bool = False) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    raw = gzip.compress(buf.getvalue()) if gz else buf.getvalue()
    return io.BytesIO(raw)


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs", max_bytes=1000, max_members=3)


@pytest.mark.parametrize("gz", [False, True])
def test_extract_stores_members_read_only(blobs: BlobStore, gz: bool) -> None:
    a, b = b"alpha", b"beta"
    assert blobs.missing([_sha(a), _sha(b)]) == [_sha(a), _sha(b)]
    stored = blobs.extract_tar(_tar([(_sha(a), a), (_sha(b), b)], gz=gz))
    assert stored == [_sha(a), _sha(b)]
    assert blobs.missing([_sha(a), _sha(b)]) == []
    path = blobs.path(_sha(a))
    assert path.read_bytes() == a and path.parent.name == _sha(a)[:2]
    assert not stat.S_IMODE(path.stat().st_mode) & 0o222


SHA = "0" * 64


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("/" + SHA, b"x")], "unsafe path"),
        ([("../" + SHA, b"x")], "unsafe path"),
        ([_special(SHA, tarfile.SYMTYPE, "/etc/passwd")], "symlink"),
        ([_special(SHA, tarfile.LNKTYPE, "/etc/passwd")], "hard link"),
        ([_special(SHA, tarfile.CHRTYPE)], "device"),
        ([_special(SHA, tarfile.BLKTYPE)], "device"),
        ([_special(SHA, tarfile.DIRTYPE)], "directory"),
        ([_special(SHA, tarfile.FIFOTYPE)], "fifo"),
        ([("notahash.txt", b"x")], "not named by a sha256"),
        ([(SHA, b"wrong content")], "content hashes to"),
        ([(_sha(bytes([i])), bytes([i])) for i in range(4)], "more than 3 members"),
        ([(_sha(b"y" * 1001), b"y" * 1001)], "exceeds 1000 bytes"),
    ],
)
def test_unsafe_tars_are_refused(blobs: BlobStore, members: list, message: str) -> None:
    with pytest.raises(BlobError, match=message):
        blobs.extract_tar(_tar(members))
    assert blobs.missing([SHA]) == [SHA]
    assert not list(blobs.root.rglob("*.tmp"))  # nothing half-written is left


def test_not_a_tar_is_refused(blobs: BlobStore) -> None:
    with pytest.raises(BlobError, match="not a readable tar"):
        blobs.extract_tar(io.BytesIO(b"definitely not a tar archive" * 30))


def test_missing_rejects_malformed_hashes(blobs: BlobStore) -> None:
    with pytest.raises(BlobError, match="64 lowercase hex"):
        blobs.missing(["../../etc/passwd"])


def test_materialise_links_files_and_reuses_tree(blobs: BlobStore, tmp_path: Path) -> None:
    app, asset = blobs.put_bytes(b"print('hi')\n"), blobs.put_bytes(b"\x00\x01")
    dest = tmp_path / "bundles" / "tree1"
    out = blobs.materialise({"src/app.py": app, "assets/x.bin": asset}, dest)
    assert (out / "src/app.py").read_bytes() == b"print('hi')\n"
    assert (out / "src/app.py").stat().st_ino == blobs.path(app).stat().st_ino
    assert blobs.materialise({"other.py": app}, dest) == dest  # same name: reused as is
    assert not (dest / "other.py").exists()
    assert [p.name for p in dest.parent.iterdir()] == ["tree1"]


@pytest.mark.parametrize("relpath", ["/etc/passwd", "../x", "a/../../x", "", "a\\b", "a//b", "./a"])
def test_materialise_refuses_unsafe_paths(blobs: BlobStore, tmp_path: Path, relpath: str) -> None:
    sha = blobs.put_bytes(b"x")
    with pytest.raises(BlobError, match="file path"):
        blobs.materialise({relpath: sha}, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_materialise_refuses_missing_blobs(blobs: BlobStore, tmp_path: Path) -> None:
    with pytest.raises(BlobError, match=f"blobs not uploaded: {SHA}"):
        blobs.materialise({"a.py": SHA}, tmp_path / "t")
