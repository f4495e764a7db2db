"""The gateway inside the real service: real SDK apps, built with uv, called end to end."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from service_helpers import ServiceProcess, deploy, make_bundle

pytestmark = pytest.mark.slow

STREAMING_APP = """
import asyncio
import os
import ssl
import fal
from starlette.responses import StreamingResponse
from starlette.websockets import WebSocket


class Streamer(fal.App):
    @fal.endpoint("/stream")
    def stream(self) -> StreamingResponse:
        async def events():
            yield b'data: {"n": 1}\\n\\n'
            for _ in range(2000):  # hold event 2 until the test opens the gate
                if os.path.exists("/tmp/" + os.environ.get("FAL_RUNNER_ID", "") + ".gate"):
                    break
                await asyncio.sleep(0.01)
            yield b'data: {"n": 2}\\n\\n'
        return StreamingResponse(events(), media_type="text/event-stream")

    @fal.endpoint("/ws", is_websocket=True)
    async def ws(self, websocket: WebSocket) -> None:
        await websocket.accept()
        while True:
            text = await websocket.receive_text()
            if text == "bye":
                await websocket.close(code=4002)
                return
            await websocket.send_text(text.upper())
"""


def test_deployed_app_is_served_through_the_gateway(
    service: ServiceProcess, tmp_path: Path
) -> None:
    with service.client() as client:
        events = list(deploy(client, make_bundle(tmp_dir=tmp_path, app_name="echo")))
        assert events[-1]["event"] == "done", events
        owner = events[-1]["app"]["owner"]
        resp = client.post(f"/{owner}/echo", json={"text": "hi"})
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"text": "echo: hi"}
        assert len(resp.headers["x-fal-request-id"]) == 32
        bad = client.post(f"/{owner}/echo", json={"wrong": 1})
        assert bad.status_code == 422 and "x-fal-request-id" in bad.headers
        runners = client.get("/v1/runners").json()["runners"]
        assert [r["state"] for r in runners] == ["IDLE"]
    with service.client(key="") as anonymous:
        refused = anonymous.post(f"/{owner}/echo", json={"text": "hi"})
        assert refused.status_code == 401 and refused.headers["x-fal-error-type"] == "unauthorized"


def _deploy_streamer(service: ServiceProcess, tmp_path: Path) -> str:
    bundle = make_bundle(STREAMING_APP, "Streamer", tmp_dir=tmp_path, app_name="streamer")
    with service.client() as client:
        events = list(deploy(client, bundle, auth="public"))
        assert events[-1]["event"] == "done", events
        return f"{service.url}/{events[-1]['app']['owner']}/streamer"


def test_sdk_streaming_endpoint_streams_through_the_gateway(
    service: ServiceProcess, tmp_path: Path
) -> None:
    asyncio.run(_stream(_deploy_streamer(service, tmp_path), service))


def test_sdk_websocket_endpoint_through_the_gateway(
    service: ServiceProcess, tmp_path: Path
) -> None:
    asyncio.run(_socket(_deploy_streamer(service, tmp_path)))


async def _stream(base: str, service: ServiceProcess) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{base}/stream", json={}) as resp:
            assert resp.status == 200 and "x-fal-request-id" in resp.headers
            first = await asyncio.wait_for(resp.content.readline(), 30)
            assert json.loads(first.removeprefix(b"data: ")) == {"n": 1}
            with service.client() as api:
                runner_id = api.get("/v1/runners").json()["runners"][0]["id"]
            gate = Path(f"/tmp/{runner_id}.gate")
            gate.touch()  # event 2 only exists after event 1 reached us
            try:
                assert b'{"n": 2}' in await resp.read()
            finally:
                gate.unlink()


async def _socket(base: str) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.ws_connect(f"{base}/ws") as ws:
            await ws.send_str("hello")
            assert (await ws.receive(timeout=30)).data == "HELLO"
            await ws.send_str("bye")
            assert (await ws.receive(timeout=30)).type == aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 4002


FAL_CLIENT_CALL = """
import json, sys
import fal_client
result = fal_client.run(sys.argv[1], arguments={"text": "from fal-client"}, start_timeout=60)
print(json.dumps(result))
"""


def test_unmodified_fal_client_calls_the_gateway(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    service = service_factory("--tls-cert", str(cert), "--tls-key", str(key))
    with service.client(verify=ssl.create_default_context(cafile=str(cert))) as client:
        events = list(deploy(client, make_bundle(tmp_dir=tmp_path, app_name="echo")))
        assert events[-1]["event"] == "done", events
        owner = events[-1]["app"]["owner"]
    host = service.url.removeprefix("https://")
    env = {**os.environ, "FAL_RUN_HOST": host, "FAL_KEY": service.admin_key,
           "SSL_CERT_FILE": str(cert)}  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", FAL_CLIENT_CALL, f"{owner}/echo"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout) == {"text": "echo: from fal-client"}
