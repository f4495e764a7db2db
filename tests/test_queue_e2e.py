"""The queue end to end: real fleet, real runner processes, real HTTP on 127.0.0.1.

Each test runs ``queue_stack`` (store + fleet + gateway + queue behind uvicorn) and drives it
over HTTP exactly as a client would; ``calls.log`` written by the runners tells how many
times a request really ran.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from queue_helpers import OWNER, QStack, queue_stack, wait_for

from buildsvc.queue.retry import MAX_ATTEMPTS

pytestmark = pytest.mark.slow

Scenario = Callable[[QStack, aiohttp.ClientSession], Awaitable[None]]


def _run(scenario: Scenario, tmp_path: Path, **stack_args: Any) -> None:
    async def main() -> None:
        async with queue_stack(tmp_path / "data", **stack_args) as s:
            async with aiohttp.ClientSession() as client:
                await scenario(s, client)

    asyncio.run(main())


async def _submit(
    client: aiohttp.ClientSession, s: QStack, path: str, body: Any = None, **headers: str
) -> dict[str, Any]:
    async with client.post(s.q(path), json=body or {}, headers=headers) as r:
        data = await r.json()
        assert r.status == 200, data
        assert r.headers["x-fal-request-id"] == data["request_id"]
        return dict(data)


async def _status(client: aiohttp.ClientSession, sub: dict[str, Any], logs: bool = False) -> Any:
    async with client.get(sub["status_url"], params={"logs": "1"} if logs else None) as r:
        assert r.status == 200
        return await r.json()


async def _done(client: aiohttp.ClientSession, sub: dict[str, Any], timeout: float = 30) -> Any:
    async def completed() -> Any:
        data = await _status(client, sub)
        return data if data["status"] == "COMPLETED" else None

    return await wait_for(completed, timeout, f"request {sub['request_id']} to complete")


async def _result(client: aiohttp.ClientSession, sub: dict[str, Any]) -> tuple[int, Any, Any]:
    async with client.get(sub["response_url"]) as r:
        return r.status, await r.json(), r.headers


def _ran(s: QStack, app: str, rid: str) -> list[list[str]]:
    return [c for c in s.calls(app) if c[0] == rid]


def test_submit_status_with_logs_and_result(tmp_path: Path) -> None:
    async def scenario(s: QStack, client: aiohttp.ClientSession) -> None:
        s.deploy("echo")
        sub = await _submit(client, s, "echo/log?x=1", {"text": "hi"})
        base = f"{s.url}/queue/{OWNER}/echo/requests/{sub['request_id']}"
        assert (sub["response_url"], sub["status_url"], sub["cancel_url"]) == (
            base, base + "/status", base + "/cancel")  # fmt: skip
        status = await _done(client, sub)
        assert "error" not in status and status["metrics"]["inference_time"] >= 0
        code, body, headers = await _result(client, sub)
        assert code == 200 and headers["x-fal-request-id"] == sub["request_id"]
        assert body["path"] == "/log" and json.loads(body["body"]) == {"text": "hi"}
        wanted = f"endpoint log line {sub['request_id']}"

        async def logged() -> Any:
            data = await _status(client, sub, logs=True)
            return data if wanted in [entry["message"] for entry in data["logs"]] else None

        with_logs = await wait_for(logged, 10, "the endpoint's line in the request's logs")
        assert set(with_logs["logs"][0]) == {"message", "level", "source", "timestamp"}

    _run(scenario, tmp_path)


def test_status_reports_queue_position_while_runner_is_busy(tmp_path: Path) -> None:
    async def scenario(s: QStack, client: aiohttp.ClientSession) -> None:
        s.deploy("one", max_concurrency=1)
        busy = await _submit(client, s, "one/sleep?s=1.5")
        await wait_for(lambda: _status_is(client, busy, "IN_PROGRESS"), what="first to start")
        low = await _submit(client, s, "one/echo", **{"X-Fal-Queue-Priority": "low"})
        normal = await _submit(client, s, "one/echo")
        assert (await _status(client, normal))["queue_position"] == 0  # normal beats low
        assert (await _status(client, low))["queue_position"] == 1
        async with client.get(normal["response_url"]) as r:  # not done: 202, never 200
            assert r.status == 202 and (await r.json())["status"] == "IN_QUEUE"
        await _done(client, low)
        order = [c[0] for c in s.calls("one")]
        assert order == [busy["request_id"], normal["request_id"], low["request_id"]]

    _run(scenario, tmp_path)


async def _status_is(client: aiohttp.ClientSession, sub: dict[str, Any], want: str) -> bool:
    return bool((await _status(client, sub))["status"] == want)


def test_runner_killed_mid_request_is_retried_on_another_runner(tmp_path: Path) -> None:
    async def scenario(s: QStack, client: aiohttp.ClientSession) -> None:
        s.deploy("slow")
        sub = await _submit(client, s, "slow/sleep?s=1")
        rid = sub["request_id"]
        await wait_for(lambda: _ran(s, "slow", rid), what="the first attempt to reach a runner")
        os.kill(int(_ran(s, "slow", rid)[0][2]), signal.SIGKILL)
        await _done(client, sub)
        code, body, _ = await _result(client, sub)
        runs = _ran(s, "slow", rid)
        assert code == 200 and len(runs) == 2 and runs[0][2] != runs[1][2]
        assert body["pid"] == int(runs[1][2])
        assert s.queue.store.get(rid).attempt == 2

    _run(scenario, tmp_path)


def test_a_crashing_endpoint_gets_exactly_max_attempts(tmp_path: Path) -> None:
    async def scenario(s: QStack, client: aiohttp.ClientSession) -> None:
        s.deploy("crashy")
        sub = await _submit(client, s, "crashy/crash")
        status = await _done(client, sub, timeout=90)
        assert status["error_type"] == "runner_disconnected"
        code, body, headers = await _result(client, sub)
        assert code == 503 and body["error_type"] == "runner_disconnected"
        assert headers["x-fal-error-type"] == "runner_disconnected"
        runs = _ran(s, "crashy", sub["request_id"])
        assert len(runs) == MAX_ATTEMPTS == 10 and len({r[2] for r in runs}) == MAX_ATTEMPTS

    _run(scenario, tmp_path)


def test_cancel_in_queue_never_runs_and_cancel_in_progress_ends_it(tmp_path: Path) -> None:
    async def scenario(s: QStack, client: aiohttp.ClientSession) -> None:
        s.deploy("one", max_concurrency=1)
        running = await _submit(client, s, "one/hang")
        waiting = await _submit(client, s, "one/echo")
        await wait_for(lambda: _status_is(client, running, "IN_PROGRESS"), what="hang to start")
        async with client.put(waiting["cancel_url"]) as r:
            assert r.status == 202 and (await r.json())["status"] == "CANCELLATION_REQUESTED"
        async with client.put(running["cancel_url"]) as r:
            assert r.status == 202
        for sub in (waiting, running):
            status = await _done(client, sub, timeout=10)
            assert status["error_type"] == "client_cancelled"
            assert (await _result(client, sub))[0] == 499
        async with client.put(waiting["cancel_url"]) as r:
            assert r.status == 400 and (await r.json())["status"] == "ALREADY_COMPLETED"
        after = await _submit(client, s, "one/echo")  # the runner still serves
        await _done(client, after)
        assert _ran(s, "one", waiting["request_id"]) == []
        assert len(_ran(s, "one", running["request_id"])) == 1

    _run(scenario, tmp_path)


@pytest.mark.parametrize(
    ("path", "headers", "runs", "status", "error_type"),
    [
        ("code?status=422", {}, 1, 422, "http_error"),
        ("code?status=404", {}, 1, 404, "http_error"),
        ("code?status=500", {}, 1, 500, "internal_error"),
        ("code?status=502", {}, 1, 502, "internal_error"),
        ("code?status=503", {"X-Fal-No-Retry": "1"}, 1, 503, "runner_unavailable"),
        ("code?status=503&retry=0", {}, 1, 503, "runner_unavailable"),
        ("code?status=500&retry=1", {}, MAX_ATTEMPTS, 500, "internal_error"),
    ],
)
def test_what_is_and_is_not_retried(
    tmp_path: Path, path: str, headers: dict[str, str], runs: int, status: int, error_type: str
) -> None:
    async def scenario(s: QStack, client: aiohttp.ClientSession) -> None:
        s.deploy("codes", max_concurrency=3)
        sub = await _submit(client, s, f"codes/{path}", **headers)
        done = await _done(client, sub, timeout=60)
        code, body, _ = await _result(client, sub)
        assert (code, body["error_type"], done["error_type"]) == (status, error_type, error_type)
        assert len(_ran(s, "codes", sub["request_id"])) == runs

    _run(scenario, tmp_path)


def test_skip_retry_conditions_and_request_timeout(tmp_path: Path) -> None:
    async def scenario(s: QStack, client: aiohttp.ClientSession) -> None:
        s.deploy("strict", request_timeout=1, skip_retry_conditions=["timeout", "server_error"])
        hang = await _submit(client, s, "strict/hang")
        crash = await _submit(client, s, "strict/crash")
        assert (await _done(client, hang))["error_type"] == "request_timeout"
        assert (await _result(client, hang))[0] == 504
        assert (await _done(client, crash))["error_type"] == "runner_disconnected"
        assert len(_ran(s, "strict", hang["request_id"])) == 1
        assert len(_ran(s, "strict", crash["request_id"])) == 1

    _run(scenario, tmp_path)


def test_caller_request_timeout_is_a_user_504_never_retried(tmp_path: Path) -> None:
    async def scenario(s: QStack, client: aiohttp.ClientSession) -> None:
        s.deploy("one", max_concurrency=1)
        busy = await _submit(client, s, "one/sleep?s=3")
        late = await _submit(client, s, "one/echo", **{"X-Fal-Request-Timeout": "0.5"})
        done = await _done(client, late, timeout=10)
        async with client.get(late["response_url"]) as r:
            assert r.status == 504 and r.headers["x-fal-request-timeout-type"] == "user"
        assert done["error_type"] == "request_timeout"
        assert _ran(s, "one", late["request_id"]) == []
        async with client.put(busy["cancel_url"]):
            pass

    _run(scenario, tmp_path)


def test_late_answer_of_an_attempt_that_lost_its_lease_is_dropped(tmp_path: Path) -> None:
    async def scenario(s: QStack, client: aiohttp.ClientSession) -> None:
        s.deploy("slow")
        sub = await _submit(client, s, "slow/sleep?s=1.5")
        rid = sub["request_id"]
        await wait_for(lambda: _ran(s, "slow", rid), what="attempt 1 to start")
        # Another service instance's reaper would do this once attempt 1's lease ran out:
        assert s.queue.store.expire_leases(float("inf")) == [rid]
        s.queue.dispatcher.wake(OWNER, "slow")
        await wait_for(lambda: len(_ran(s, "slow", rid)) == 2, what="attempt 2 to start")
        await _done(client, sub)
        first, second = _ran(s, "slow", rid)
        code, body, _ = await _result(client, sub)
        assert code == 200 and body["pid"] == int(second[2]) != int(first[2])
        assert s.queue.store.get(rid).attempt == 2

    _run(scenario, tmp_path)


def test_private_app_queue_needs_the_owners_key(tmp_path: Path) -> None:
    async def scenario(s: QStack, client: aiohttp.ClientSession) -> None:
        s.deploy("secret", auth="private")
        _, own = s.keyring.create(OWNER)
        _, other = s.keyring.create("bob")
        async with client.post(s.q("secret/echo"), json={}) as r:
            assert r.status == 401 and r.headers["x-fal-error-type"] == "unauthorized"
        sub = await _submit(client, s, "secret/echo", Authorization=f"Key {own}")
        async with client.get(sub["status_url"], headers={"Authorization": f"Key {other}"}) as r:
            assert r.status == 403
        async with client.get(sub["response_url"]) as r:
            assert r.status == 401
        await wait_for(lambda: _ran(s, "secret", sub["request_id"]), what="the request to run")
        stored = s.queue.store.get(sub["request_id"])
        assert all(k.lower() != "authorization" for k, _ in stored.headers)

    _run(scenario, tmp_path)


def test_bad_inputs_are_400_naming_the_fix(tmp_path: Path) -> None:
    async def scenario(s: QStack, client: aiohttp.ClientSession) -> None:
        s.deploy("echo")
        for headers, url, needle in (
            ({"X-Fal-Queue-Priority": "urgent"}, s.q("echo"), "'normal' or 'low'"),
            ({"X-Fal-Request-Timeout": "soon"}, s.q("echo"), "seconds > 0"),
            ({}, s.q("echo?fal_webhook=ftp://x"), "http(s) URL"),
        ):
            async with client.post(url, json={}, headers=headers) as r:
                assert r.status == 400 and needle in (await r.json())["detail"]
        async with client.post(s.q("ghost"), json={}) as r:
            assert r.status == 404 and (await r.json())["error_type"] == "app_not_found"
        async with client.get(s.q("echo/requests/nope/status")) as r:
            assert r.status == 404 and "x-fal-request-id" in r.headers

    _run(scenario, tmp_path)


def test_status_stream_and_webhook_with_retries(tmp_path: Path) -> None:
    hooks: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        hooks.append(await request.json())
        return web.Response(status=500 if len(hooks) == 1 else 200)  # first delivery fails

    async def scenario(s: QStack, client: aiohttp.ClientSession) -> None:
        receiver = web.Application()
        receiver.router.add_post("/hook", hook)
        runner = web.AppRunner(receiver)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        s.deploy("echo")
        sub = await _submit(client, s, f"echo/sleep?s=0.3&fal_webhook=http://127.0.0.1:{port}/hook")
        events = []
        async with client.get(sub["status_url"] + "/stream") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            async for line in r.content:
                if line.startswith(b"data: "):
                    events.append(json.loads(line[6:])["status"])
        assert events[-1] == "COMPLETED" and "IN_PROGRESS" in events
        await wait_for(lambda: len(hooks) == 2, what="the webhook's second delivery")
        assert hooks[1]["request_id"] == sub["request_id"] and hooks[1]["status"] == "OK"
        assert hooks[1]["payload"]["path"] == "/sleep"
        await wait_for(lambda: s.queue.store.get(sub["request_id"]).webhook_state == "delivered")
        await runner.cleanup()

    _run(scenario, tmp_path)
