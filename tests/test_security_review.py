"""Regression tests for the trust-boundary review: each one fails without its fix.

- management JSON bodies are read under a cap (a huge body was read whole into memory);
- an unknown ``/{owner}/{app}`` (anyone may send one, no key needed) leaves nothing cached;
- probing log names of apps that do not exist leaves no in-memory ring behind;
- the CLI config (it may hold a key) ends up 0600 even over a leftover temp file.
"""

from __future__ import annotations

import asyncio
import socket
import stat
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from service_helpers import ServiceProcess
from starlette.requests import Request

from buildsvc.api import deps
from buildsvc.logs import LogHub, LogRecord
from buildsvc.store import SQLiteStore
from falcli import settings


def _raw_exchange(url: str, head: bytes, timeout: float = 10.0) -> bytes:
    """Send ``head`` (no body follows) and return what the service answers first."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(head)
        return sock.recv(65536)


def test_declared_oversized_json_body_is_refused_before_reading(
    module_service: ServiceProcess,
) -> None:
    # Without the cap the service waits to read 1 TB into memory: recv() times out.
    head = (
        "POST /v1/keys HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        f"authorization: Key {module_service.admin_key}\r\n"
        "content-length: 1000000000000\r\n\r\n"
    ).encode()
    answer = _raw_exchange(module_service.url, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"too_large" in answer


def test_small_json_bodies_still_work(module_service: ServiceProcess) -> None:
    with httpx.Client(base_url=module_service.url, timeout=10) as client:
        auth = {"authorization": f"Key {module_service.admin_key}"}
        made = client.post("/v1/keys", json={"name": "ci"}, headers=auth)
        bad = client.post("/v1/keys", content=b"[1, 2]", headers=auth)
    assert made.status_code == 200 and made.json()["key"]
    assert bad.status_code == 400 and "JSON object" in bad.json()["detail"]


def _streamed_request(chunks: list[bytes]) -> Request:
    """A real Starlette request whose body arrives chunked, with no Content-Length."""
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/v1/keys", "headers": []}
    return Request(scope, receive)


def test_streamed_json_body_over_cap_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deps, "_MAX_JSON_BYTES", 100)
    over = _streamed_request([b'{"a": "', b"x" * 80, b'", "b": "' + b"y" * 40 + b'"}'])
    with pytest.raises(deps.ApiError) as caught:
        asyncio.run(deps.json_object(over))
    assert caught.value.status == 413
    under = _streamed_request([b'{"a":', b' "x"}'])
    assert asyncio.run(deps.json_object(under)) == {"a": "x"}


def test_unknown_apps_leave_nothing_in_the_resolve_cache(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "service.db")
    try:
        for i in range(500):  # what an unauthenticated GET /{random}/{random} does
            assert store.resolve("nobody", f"app-{i}") is None
        assert len(store._cache) == 0
    finally:
        store.close()


def test_unknown_app_paths_still_404_on_the_gateway(module_service: ServiceProcess) -> None:
    with httpx.Client(base_url=module_service.url, timeout=10) as client:
        answers = [client.get(f"/someone/app-{i}").status_code for i in range(5)]
    assert answers == [404] * 5


def test_log_probes_of_unknown_apps_keep_no_rings(tmp_path: Path) -> None:
    hub = LogHub(tmp_path)
    for i in range(500):  # GET /v1/apps/app-{i}/logs with any valid key
        assert hub.recent("alice", f"app-{i}", 1) == []
    assert len(hub._rings) == 0
    hub.emit(LogRecord(time.time(), "INFO", "runner", "alice", "real", None, None, "hello"))
    hub.close()
    reopened = LogHub(tmp_path)  # a deleted app's logs are still read back from disk
    assert [r.message for r in reopened.recent("alice", "real", 10)] == ["hello"]


def test_config_is_0600_even_over_a_leftover_temp_file(tmp_path: Path) -> None:
    leftover = settings.config_path(tmp_path).with_suffix(".toml.tmp")
    leftover.write_text("stale")
    leftover.chmod(0o644)
    settings.write_config(tmp_path, {"key": "0123456789abcdef:secret"})
    mode = stat.S_IMODE(settings.config_path(tmp_path).stat().st_mode)
    assert mode == 0o600, oct(mode)
