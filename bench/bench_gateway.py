"""What the gateway costs: a runner called directly vs through the gateway, and cold starts.

Run: ``python bench/bench_gateway.py [--seconds 3] [--cold 3]``.

Starts the real service (``python -m buildsvc``: uvloop + httptools) on a temporary data
dir, deploys a real SDK app (a pydantic echo, built by uv), then, from one load-generating
process (aiohttp on uvloop, keep-alive connections):

* warm: p50/p99 latency and req/s of ``POST /`` on the runner's own URL and of
  ``POST /{owner}/bench`` through the gateway, at concurrency 1 and 32;
* cold: request -> response with no runner up (the env is cached; a second app with
  keep_alive = 1 is left to be reaped before each try).

The load generator shares the machine's CPUs with the service and the runner, so req/s at
concurrency 32 is a lower bound for all three together, not the gateway alone.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from service_helpers import ServiceProcess, deploy, make_bundle  # noqa: E402

_BODY = {"text": "hello"}


@dataclass
class Result:
    name: str
    concurrency: int
    latencies: list[float]
    seconds: float

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds


async def _load(url: str, headers: dict[str, str], concurrency: int, seconds: float) -> Result:
    connector = aiohttp.TCPConnector(limit=concurrency)
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=connector, headers=headers) as client:

        async def worker(until: float, record: bool) -> None:
            while time.perf_counter() < until:
                started = time.perf_counter()
                async with client.post(url, json=_BODY) as resp:
                    await resp.read()
                    assert resp.status == 200, resp.status
                if record:
                    latencies.append(time.perf_counter() - started)

        warmup = time.perf_counter() + 0.5
        await asyncio.gather(*(worker(warmup, False) for _ in range(concurrency)))
        started = time.perf_counter()
        until = started + seconds
        await asyncio.gather(*(worker(until, True) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return Result(url, concurrency, latencies, elapsed)


def _arun(coro: Coroutine[Any, Any, Result]) -> Result:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _deploy(svc: ServiceProcess, tmp: Path, name: str, **options: object) -> str:
    with svc.client() as client:
        bundle = make_bundle(tmp_dir=tmp, app_name=name, options=options)
        events = list(deploy(client, bundle))
        if events[-1].get("event") != "done":
            raise SystemExit(f"deploy of {name} failed: {events[-1]}")
        return str(events[-1]["app"]["owner"])


def _runners(svc: ServiceProcess, app: str) -> list[dict[str, object]]:
    with svc.client() as client:
        return list(client.get("/v1/runners", params={"app": app}).json()["runners"])


def _cold_starts(svc: ServiceProcess, owner: str, tries: int) -> list[float]:
    times = []
    headers = {"Authorization": f"Key {svc.admin_key}"}
    with httpx.Client(base_url=svc.url, headers=headers, timeout=120) as client:
        for _ in range(tries):
            deadline = time.monotonic() + 30
            while _runners(svc, "cold") and time.monotonic() < deadline:
                time.sleep(0.05)
            started = time.perf_counter()
            resp = client.post(f"/{owner}/cold", json=_BODY)
            times.append(time.perf_counter() - started)
            assert resp.status_code == 200, resp.text
    return times


def _table(rows: list[tuple[Result, Result]]) -> str:
    lines = [
        f"{'conc':>4} | {'direct p50':>10} {'p99':>7} {'req/s':>7} | "
        f"{'gateway p50':>11} {'p99':>7} {'req/s':>7} | {'p50 ratio':>9} {'added p50':>9}",
    ]
    for direct, gw in rows:
        lines.append(
            f"{direct.concurrency:>4} | {direct.pct(0.5):>8.2f}ms {direct.pct(0.99):>5.2f}ms "
            f"{direct.rps:>7.0f} | {gw.pct(0.5):>9.2f}ms {gw.pct(0.99):>5.2f}ms {gw.rps:>7.0f} | "
            f"{gw.pct(0.5) / direct.pct(0.5):>8.2f}x {gw.pct(0.5) - direct.pct(0.5):>7.2f}ms"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per phase")
    parser.add_argument("--cold", type=int, default=3, help="cold starts to time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        svc = ServiceProcess(tmp / "data").start()
        try:
            _run(svc, tmp, args.seconds, args.cold)
        finally:
            svc.stop()


def _run(svc: ServiceProcess, tmp: Path, seconds: float, cold: int) -> None:
    owner = _deploy(svc, tmp, "bench", keep_alive=600, max_concurrency=1, max_multiplexing=64)
    headers = {"Authorization": f"Key {svc.admin_key}"}
    gateway_url = f"{svc.url}/{owner}/bench"
    _arun(_load(gateway_url, headers, 1, 0.1))
    runner_url = str(_runners(svc, "bench")[0]["url"]) + "/"
    rows = []
    for concurrency in (1, 32):
        direct = _arun(_load(runner_url, {}, concurrency, seconds))
        gw = _arun(_load(gateway_url, headers, concurrency, seconds))
        rows.append((direct, gw))
    print("warm requests (POST JSON echo, one runner, max_multiplexing 64):")
    print(_table(rows))
    _deploy(svc, tmp, "cold", keep_alive=1)
    times = _cold_starts(svc, owner, cold)
    print(f"\ncold start (request -> response, env cached), {cold} tries: "
          f"median {statistics.median(times) * 1000:.0f} ms, "
          f"min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
