"""The gateway against real runner processes: routing, auth, errors, streaming, websockets."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fleet_helpers import OWNER, Stack, stack, wait_for
from yarl import URL

import buildsvc.gateway.proxy
import buildsvc.gateway.websocket

pytestmark = pytest.mark.slow


def _run(scenario: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with stack(tmp_path) as s, aiohttp.ClientSession() as client:
            await scenario(s, client)

    asyncio.run(main())


def test_public_surface() -> None:
    assert buildsvc.gateway.proxy.__all__ == ["Gateway", "Target"]
    assert buildsvc.gateway.websocket.__all__ == ["relay"]


def test_request_reaches_the_runner_with_fal_headers(tmp_path: Path) -> None:
    async def scenario(s: Stack, client: aiohttp.ClientSession) -> None:
        s.deploy("echo")
        url = URL(f"{s.url}/{OWNER}/echo/echo?x=1&y=%2F", encoded=True)
        async with client.post(url, json={"a": 1}, headers={"x-fal-request-id": "mine"}) as r:
            body = await r.json()
            assert r.status == 200 and r.headers["x-fal-request-id"] == "mine"
        assert body["headers"]["x-fal-request-id"] == "mine"
        assert body["headers"]["x-fal-endpoint"] == "/echo"
        assert body["query"] == "x=1&y=%2F" and json.loads(body["body"]) == {"a": 1}
        async with client.post(f"{s.url}/{OWNER}/echo/echo", data=b"x") as r:
            generated = r.headers["x-fal-request-id"]
            assert (
                len(generated) == 32
                and (await r.json())["headers"]["x-fal-request-id"] == generated
            )

    _run(scenario, tmp_path)


def test_unknown_app_is_404_naming_it(tmp_path: Path) -> None:
    async def scenario(s: Stack, client: aiohttp.ClientSession) -> None:
        async with client.post(f"{s.url}/{OWNER}/ghost/run", json={}) as r:
            body = await r.json()
            assert r.status == 404 and r.headers["x-fal-error-type"] == "app_not_found"
            assert "x-fal-request-id" in r.headers
        assert "'alice/ghost'" in body["detail"] and body["error_type"] == "app_not_found"
        async with client.get(f"{s.url}/justone") as r:
            assert r.status == 404 and "x-fal-request-id" in r.headers

    _run(scenario, tmp_path)


def test_private_app_needs_the_owners_key(tmp_path: Path) -> None:
    async def scenario(s: Stack, client: aiohttp.ClientSession) -> None:
        s.deploy("secret", auth="private")
        _, own_key = s.keyring.create(OWNER)
        _, other_key = s.keyring.create("bob")
        url = f"{s.url}/{OWNER}/secret/echo"
        async with client.post(url, data=b"x") as r:
            assert r.status == 401 and r.headers["x-fal-error-type"] == "unauthorized"
            assert "x-fal-request-id" in r.headers and "Authorization" in (await r.json())["detail"]
        async with client.post(url, data=b"x", headers={"Authorization": f"Key {other_key}"}) as r:
            assert r.status == 403 and "bob" in (await r.json())["detail"]
        async with client.post(url, data=b"x", headers={"Authorization": f"Key {own_key}"}) as r:
            body = await r.json()
            assert r.status == 200
        assert "authorization" not in body["headers"]  # callers' keys never reach app code

    _run(scenario, tmp_path)


def test_failed_cold_start_is_503_with_the_traceback(tmp_path: Path) -> None:
    async def scenario(s: Stack, client: aiohttp.ClientSession) -> None:
        s.deploy("broken", behavior={"fail_setup": True})
        async with client.post(f"{s.url}/{OWNER}/broken/echo", data=b"x") as r:
            body = await r.json()
            assert r.status == 503 and r.headers["x-fal-error-type"] == "startup_error"
            assert "x-fal-request-id" in r.headers
        assert "model weights missing" in body["detail"] and "Traceback" in body["detail"]

    _run(scenario, tmp_path)


def test_request_timeout_header_gives_504_user(tmp_path: Path) -> None:
    async def scenario(s: Stack, client: aiohttp.ClientSession) -> None:
        s.deploy("single", max_concurrency=1)
        busy = asyncio.create_task(client.post(f"{s.url}/{OWNER}/single/sleep?s=2"))
        await wait_for(lambda: any(r.in_flight for r in s.runners("single")), what="busy runner")
        headers = {"X-Fal-Request-Timeout": "0.2"}
        async with client.post(f"{s.url}/{OWNER}/single/echo", headers=headers) as r:
            assert r.status == 504 and r.headers["X-Fal-Request-Timeout-Type"] == "user"
            assert (await r.json())["error_type"] == "request_timeout"
        async with client.post(
            f"{s.url}/{OWNER}/single/echo", headers={"X-Fal-Request-Timeout": "soon"}
        ) as r:
            assert r.status == 400 and "X-Fal-Request-Timeout" in (await r.json())["detail"]
        (await busy).release()

    _run(scenario, tmp_path)


def test_server_sent_events_are_streamed_as_they_come(tmp_path: Path) -> None:
    async def scenario(s: Stack, client: aiohttp.ClientSession) -> None:
        _, rev = s.deploy("sse")
        gate = Path(rev.workdir) / "gate"  # the runner holds event 2 until this file exists
        async with client.post(f"{s.url}/{OWNER}/sse/stream", json={}) as r:
            assert r.status == 200 and r.headers["content-type"] == "text/event-stream"
            assert "x-fal-request-id" in r.headers
            first = await asyncio.wait_for(r.content.readline(), 10)
            assert json.loads(first.removeprefix(b"data: "))["n"] == 1
            assert not gate.exists()  # event 1 arrived while the runner was still going
            gate.touch()
            rest = (await r.read()).decode()
        assert '"n": 2' in rest

    _run(scenario, tmp_path)


def test_websocket_echo_and_close_code(tmp_path: Path) -> None:
    async def scenario(s: Stack, client: aiohttp.ClientSession) -> None:
        s.deploy("ws")
        async with client.ws_connect(f"{s.url}/{OWNER}/ws/ws") as ws:
            await ws.send_str("hi")
            assert (await ws.receive(timeout=10)).data == "echo:hi"
            await ws.send_bytes(b"abc")
            assert (await ws.receive(timeout=10)).data == b"cba"
            await ws.send_str("close:4001")
            closing = await ws.receive(timeout=10)
            assert closing.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 4001
        await wait_for(lambda: s.runners("ws")[0].in_flight == 0, what="the slot to come back")
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(f"{s.url}/{OWNER}/nope/ws")
        assert refused.value.status == 404

    _run(scenario, tmp_path)


def test_runner_hints_route_later_requests(tmp_path: Path) -> None:
    async def scenario(s: Stack, client: aiohttp.ClientSession) -> None:
        s.deploy("hinted", max_concurrency=2)
        url = f"{s.url}/{OWNER}/hinted/sleep?s=0.3"

        async def call(**headers: str) -> int:
            async with client.post(url, headers=headers) as r:
                return int((await r.json())["pid"])

        pids = set(await asyncio.gather(call(), call()))  # two runners, both answer hints
        assert len(pids) == 2
        default = await call()
        other = (pids - {default}).pop()
        for _ in range(3):
            assert await call(**{"X-Fal-Runner-Hint": f"pid-{other}"}) == other

    _run(scenario, tmp_path)


def test_lost_runner_is_503_runner_disconnected_and_replaced(tmp_path: Path) -> None:
    async def scenario(s: Stack, client: aiohttp.ClientSession) -> None:
        s.deploy("crashy")
        async with client.post(f"{s.url}/{OWNER}/crashy/echo") as r:
            first = (await r.json())["pid"]
        async with client.post(f"{s.url}/{OWNER}/crashy/crash") as r:
            assert r.status == 503 and r.headers["x-fal-error-type"] == "runner_disconnected"
            assert "x-fal-request-id" in r.headers
        async with client.post(f"{s.url}/{OWNER}/crashy/echo") as r:
            assert r.status == 200 and (await r.json())["pid"] != first

    _run(scenario, tmp_path)


def test_runner_503_is_relayed_and_the_runner_replaced(tmp_path: Path) -> None:
    async def scenario(s: Stack, client: aiohttp.ClientSession) -> None:
        s.deploy("oom")
        async with client.post(f"{s.url}/{OWNER}/oom/unavailable") as r:
            assert r.status == 503 and (await r.json())["detail"] == "out of memory"
        await wait_for(lambda: not s.runners("oom"), what="the broken runner to stop")

    _run(scenario, tmp_path)


def test_warm_gateway_overhead_is_small(tmp_path: Path) -> None:
    async def scenario(s: Stack, client: aiohttp.ClientSession) -> None:
        s.deploy("fast")
        url = f"{s.url}/{OWNER}/fast/echo"
        async with client.post(url, data=b"x") as r:
            assert r.status == 200
        started = time.perf_counter()
        for _ in range(50):
            async with client.post(url, data=b"x") as r:
                await r.read()
        per_call = (time.perf_counter() - started) / 50
        assert per_call < 0.03, f"{per_call * 1000:.1f} ms per warm call"  # loose: shared CPUs

    _run(scenario, tmp_path)


def test_request_timeout_option_gives_504_and_replaces_the_runner(tmp_path: Path) -> None:
    async def scenario(s: Stack, client: aiohttp.ClientSession) -> None:
        s.deploy("slowpoke", request_timeout=1)
        async with client.post(f"{s.url}/{OWNER}/slowpoke/sleep?s=5") as r:
            assert r.status == 504 and r.headers["x-fal-error-type"] == "request_timeout"
            assert (
                "x-fal-request-id" in r.headers and "request_timeout" in (await r.json())["detail"]
            )
        await wait_for(lambda: not s.runners("slowpoke"), what="the stuck runner to be replaced")

    _run(scenario, tmp_path)
