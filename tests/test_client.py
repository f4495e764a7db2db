"""The HTTP client: error mapping, streamed blob tars, and the deploy helper.

These drive ``Client`` through its ``transport=`` seam (``httpx.MockTransport``); the real
service is exercised by tests/test_e2e*.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

import falcli.client
from falcli.client import Client, deploy_bundle
from falcli.client.blobs import iter_tar
from falcli.errors import (
    AuthError,
    ClientError,
    NotFoundError,
    ServerError,
    ServiceUnavailable,
)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _client(handler: Any, key: str | None = "kid:secret") -> Client:
    return Client("http://svc.test", key, transport=httpx.MockTransport(handler))


def test_public_surface_is_curated() -> None:
    assert sorted(falcli.client.__all__) == [
        "BundleLike",
        "Client",
        "DeployEvent",
        "deploy_bundle",
        "upload_missing",
    ]


def test_sends_key_header_and_decodes_json() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"owner": "alice", "key_id": "kid", "admin": False})

    assert _client(handler).whoami()["owner"] == "alice"
    assert seen[0].headers["Authorization"] == "Key kid:secret"
    assert seen[0].url.path == "/v1/whoami"


@pytest.mark.parametrize(
    ("status", "kind", "pattern"),
    [
        (401, AuthError, r"refused the key .*401: bad key.*FAL_KEY"),
        (403, AuthError, r"403: not yours"),
        (404, NotFoundError, r"GET /v1/apps/ghost: no such app"),
        (500, ServerError, r"failed on GET /v1/apps/ghost \(500\): boom"),
        (409, ClientError, r"rejected \(409\)"),
    ],
)
def test_http_errors_map_to_the_error_tree(status: int, kind: type, pattern: str) -> None:
    detail = {401: "bad key", 403: "not yours", 404: "no such app", 500: "boom"}.get(status, "x")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"detail": detail, "error_type": "t"})

    with pytest.raises(kind, match=pattern) as info:
        _client(handler).apps.get("ghost")
    assert info.value.status == status and info.value.error_type == "t"


def test_validation_error_lists_are_kept_readable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"detail": [{"loc": ["body", "owner"], "msg": "bad"}]})

    with pytest.raises(ClientError, match=r'"loc": \["body", "owner"\]'):
        _client(handler).keys.create(owner="x")


def test_connection_refused_names_the_url_and_the_fix() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ServiceUnavailable, match=rf"127\.0\.0\.1:{port}.*fal server status"):
        Client(f"http://127.0.0.1:{port}", None).health()


def test_iter_tar_streams_files_and_bytes_as_a_valid_tar(tmp_path: Path) -> None:
    big = bytes(range(256)) * 9000  # > one read chunk is not needed; odd size tests padding
    path = tmp_path / "blob"
    path.write_bytes(big)
    small = b"hello"
    blobs = {_sha(big): path, _sha(small): small, _sha(b""): b""}
    data = b"".join(iter_tar(blobs))
    assert len(data) % 512 == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert members == {_sha(big): big, _sha(small): small, _sha(b""): b""}


@dataclass
class FakeService:
    """Records what the client sends; answers deploy with the given events."""

    have: set[str] = field(default_factory=set)
    events: list[dict[str, Any]] = field(default_factory=list)
    uploaded: list[str] = field(default_factory=list)
    deploy_body: dict[str, Any] = field(default_factory=dict)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/blobs/missing":
            hashes = json.loads(request.content)["hashes"]
            return httpx.Response(200, json={"missing": [h for h in hashes if h not in self.have]})
        if path == "/v1/blobs":
            with tarfile.open(fileobj=io.BytesIO(request.read())) as tar:
                names = [m.name for m in tar.getmembers()]
            self.uploaded += names
            self.have |= set(names)
            return httpx.Response(200, json={"stored": names})
        if path == "/v1/apps/deploy":
            self.deploy_body = json.loads(request.content)
            body = "".join(json.dumps(e) + "\n" for e in self.events)
            return httpx.Response(200, content=body.encode())
        return httpx.Response(404, json={"detail": f"no route {path}"})


@dataclass
class Bundle:
    manifest: dict[str, Any]
    blobs: dict[str, Path | bytes]


def _bundle() -> Bundle:
    a, b = b"payload", b"file"
    return Bundle(manifest={"app_name": "demo", "hash": "h"}, blobs={_sha(a): a, _sha(b): b})


def test_deploy_uploads_only_missing_blobs_and_returns_done() -> None:
    bundle = _bundle()
    already = next(iter(bundle.blobs))
    done = {"event": "done", "app": {"name": "demo"}, "urls": {"sync": "http://x/o/demo"}}
    svc = FakeService(
        have={already},
        events=[
            {"event": "log", "source": "build", "message": "Resolved 3 packages"},
            {"event": "stage", "stage": "ready"},
            done,
        ],
    )
    seen: list[dict[str, Any]] = []
    result = deploy_bundle(
        _client(svc), bundle, app_name="demo", auth="private", message="m", on_event=seen.append
    )
    assert result == done
    assert svc.uploaded == [h for h in bundle.blobs if h != already]
    assert [e["event"] for e in seen] == ["log", "stage", "done"]
    assert svc.deploy_body["manifest"] == bundle.manifest
    assert (svc.deploy_body["auth"], svc.deploy_body["ephemeral"]) == ("private", False)
    assert svc.deploy_body["message"] == "m" and svc.deploy_body["strategy"] == "rolling"


def test_deploy_with_everything_cached_uploads_nothing() -> None:
    bundle = _bundle()
    svc = FakeService(have=set(bundle.blobs), events=[{"event": "done", "app": {}}])
    deploy_bundle(_client(svc), bundle, app_name="demo", auth="public", ephemeral=True)
    assert svc.uploaded == [] and svc.deploy_body["ephemeral"] is True


def test_deploy_error_event_raises_server_error_with_detail() -> None:
    svc = FakeService(
        events=[
            {"event": "error", "error_type": "build_failed", "detail": "No solution for nope==9"},
        ]
    )
    with pytest.raises(ServerError, match=r"'demo' failed \(build_failed\)") as info:
        deploy_bundle(_client(svc), _bundle(), app_name="demo", auth="private")
    assert info.value.error_type == "build_failed"
    assert "nope==9" in info.value.detail


def test_deploy_stream_without_result_is_an_error() -> None:
    svc = FakeService(events=[{"event": "stage", "stage": "build"}])
    with pytest.raises(ServerError, match="before a result") as info:
        deploy_bundle(_client(svc), _bundle(), app_name="demo", auth="private")
    assert info.value.error_type == "stream_truncated"


def test_logs_stream_is_decoded_line_by_line() -> None:
    lines = [{"message": "a", "level": "info"}, {"message": "b", "level": "error"}]

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.params["follow"] == "1"
        body = "\n".join(json.dumps(x) for x in lines) + "\n\n"
        return httpx.Response(200, content=body.encode())

    assert list(_client(handler).apps.logs("demo", follow=True)) == lines


def test_stream_error_status_raises_before_iterating() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "app 'x' not found"})

    with pytest.raises(NotFoundError, match="app 'x' not found"):
        list(_client(handler).apps.logs("x"))
