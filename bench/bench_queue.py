"""What the durable queue costs: submits per second, and submit-to-start latency.

Run: ``python bench/bench_queue.py [--submits 4000] [--concurrency 32] [--latency 300]``.

A child process serves the queue (``tests/queue_helpers.queue_stack``: the real SQLite
queue store, fleet, gateway and queue behind uvicorn on uvloop + httptools, with real
runner processes running ``tests/queue_runner.py``); this process generates the load with
aiohttp on uvloop over keep-alive connections:

* durable submits/s: ``POST /queue/alice/parked/echo`` from ``--concurrency`` tasks, while
  the app's only runner is held by a hanging request, so every submit is a committed row
  (WAL, synchronous=NORMAL: it survives ``kill -9``) and nothing else competes for the CPU;
* submit-to-start: one request at a time to a warm runner, from the client sending the
  submit to the runner receiving the request (the runner stamps ``time.time()``);
* dead runner -> restarted: ``kill -9`` of the runner serving a queued request (with a warm
  spare runner), until the retried attempt reaches the spare (its ``time.time()`` stamp).

Targets (2-core machine): >= 1,000 submits/s; < 5 ms p50 submit-to-start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from queue_helpers import OWNER, queue_stack  # noqa: E402


async def _serve(data: Path, ready: Path) -> None:
    async with queue_stack(data) as s:
        s.deploy("fast", max_concurrency=1, keep_alive=600)
        s.deploy("parked", max_concurrency=1, keep_alive=600)
        s.deploy("victim", max_concurrency=2, keep_alive=600)
        ready.write_text(json.dumps({"url": s.url}))
        await asyncio.Event().wait()  # until the parent kills us


async def _submits(url: str, total: int, concurrency: int) -> tuple[float, int]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        async with client.post(f"{url}/queue/{OWNER}/parked/hang", json={}) as r:
            assert r.status == 200
        await asyncio.sleep(1.0)  # let the hanging request take the only runner
        left = [total]

        async def worker() -> int:
            done = 0
            while left[0] > 0:
                left[0] -= 1
                async with client.post(f"{url}/queue/{OWNER}/parked/echo", json={"i": 1}) as r:
                    await r.read()
                    done += r.status == 200
            return done

        start = time.perf_counter()
        ok = sum(await asyncio.gather(*(worker() for _ in range(concurrency))))
        return total / (time.perf_counter() - start), ok


async def _latencies(url: str, count: int) -> list[float]:
    out = []
    async with aiohttp.ClientSession() as client:
        for i in range(count + 5):
            sent = time.time()
            async with client.post(f"{url}/queue/{OWNER}/fast/echo", json={"i": i}) as r:
                response_url = (await r.json())["response_url"]
            while True:
                async with client.get(response_url) as r:
                    if r.status == 200:
                        started = (await r.json())["t"]
                        break
                await asyncio.sleep(0.002)
            if i >= 5:  # the first ones warm the runner up (cold start, connections)
                out.append(started - sent)
    return out


async def _restarts(url: str, data: Path, trials: int) -> list[float]:
    """Seconds from ``kill -9`` of the runner holding a queued request to that request
    starting on the other (warm) runner, as stamped by the runner that gets it."""
    out = []
    async with aiohttp.ClientSession() as client:
        for _ in range(trials):
            # two warm runners: the victim's and a spare
            await asyncio.gather(*(client.post(f"{url}/{OWNER}/victim/sleep?s=0.3")
                                   for _ in range(2)))  # fmt: skip
            async with client.post(f"{url}/queue/{OWNER}/victim/sleep?s=2", json={}) as r:
                sub = await r.json()
            pid = await _running_on(data, sub["request_id"])
            killed = time.time()
            os.kill(pid, signal.SIGKILL)
            while True:
                async with client.get(sub["response_url"]) as r:
                    if r.status == 200:
                        answer = await r.json()
                        break
                await asyncio.sleep(0.05)
            assert answer["pid"] != pid, "the retry ran on the killed runner?"
            out.append(answer["t"] - killed)
    return out


async def _running_on(data: Path, request_id: str) -> int:
    """The pid of the runner serving ``request_id`` (runners log each call they get)."""
    while True:
        for log in (data / "apps" / "victim").glob("*/calls.log"):
            for line in log.read_text().splitlines():
                rid, _, pid = line.split()
                if rid == request_id:
                    return int(pid)
        await asyncio.sleep(0.005)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _bench(url: str, data: Path, args: argparse.Namespace) -> None:
    latencies = await _latencies(url, args.latency)
    restarts = await _restarts(url, data, args.restarts)
    rate, ok = await _submits(url, args.submits, args.concurrency)
    print(f"{'measure':<38}{'value':>12}{'target':>12}")
    label = f"durable submits/s (c={args.concurrency})"
    print(f"{label:<38}{rate:>12.0f}{'>= 1000':>12}")
    print(f"{'  submits answered 200':<38}{ok:>12}{args.submits:>12}")
    p50, p99 = _pct(latencies, 0.5), _pct(latencies, 0.99)
    print(f"{'submit-to-start p50 (ms, warm runner)':<38}{p50:>12.2f}{'< 5':>12}")
    print(f"{'submit-to-start p99 (ms, warm runner)':<38}{p99:>12.2f}{'':>12}")
    print(f"{'submit-to-start mean (ms)':<38}{statistics.mean(latencies) * 1000:>12.2f}{'':>12}")
    label = f"dead runner -> restarted p50 (ms, n={len(restarts)})"
    print(f"{label:<38}{_pct(restarts, 0.5):>12.2f}{'':>12}")
    print(f"{'dead runner -> restarted max (ms)':<38}{max(restarts) * 1000:>12.2f}{'':>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submits", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=int, default=300, help="sequential requests timed")
    parser.add_argument("--restarts", type=int, default=10, help="runners killed mid-request")
    parser.add_argument("--serve", nargs=2, metavar=("DATA", "READY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        uvloop.run(_serve(Path(args.serve[0]), Path(args.serve[1])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready.json"
        server = subprocess.Popen([sys.executable, __file__, "--serve", f"{tmp}/data", str(ready)])
        try:
            deadline = time.monotonic() + 60
            while not ready.exists() or not ready.read_text():
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the queue server did not start")
                time.sleep(0.05)
            info: dict[str, Any] = json.loads(ready.read_text())
            uvloop.run(_bench(info["url"], Path(tmp) / "data", args))
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
