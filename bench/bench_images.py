"""Image and container figures on the real Docker engine; prints a table.

    python bench/bench_images.py [--runs 5]

- unchanged rebuild: ``ImageBuilder.ensure`` for an app whose image exists (no docker build)
- code-only rebuild: one app file changed (every layer but the code layers is cached)
- container cold start: ``DockerBackend.start`` to the first response of the app's endpoint
- through the service (``python -m buildsvc --runtime docker``): an unchanged redeploy keeps
  the warm container; a redeploy that changes an option (image already built) replaces it,
  and the first request after it is a container cold start through the gateway

Needs an engine and the base images (scripts/docker-setup.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import docker
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from docker_helpers import Blobs, make_manifest, spec_for  # noqa: E402
from runtime_helpers import RecordingEvents, pickle_app  # noqa: E402
from service_helpers import ServiceProcess, deploy, make_bundle  # noqa: E402

from buildsvc.builder.image import ImageBuilder  # noqa: E402
from buildsvc.runtime.docker import ContainerPlan, DockerBackend  # noqa: E402


async def _timed(runs: int, once: Callable[[int], Awaitable[None]]) -> list[float]:
    times = []
    for i in range(runs):
        began = time.perf_counter()
        await once(i)
        times.append((time.perf_counter() - began) * 1000)
    return times


async def _bench(root: Path, runs: int) -> list[tuple[str, list[float]]]:
    client = docker.from_env()
    blobs = Blobs(root / "blobs")
    builder = ImageBuilder(root / "builder", client=client, blob_path=blobs.path)
    payload = pickle_app(root / "payload").read_bytes()

    def manifest(code: str) -> dict[str, object]:
        return make_manifest(blobs, payload, requirements=[["six==1.16.0"]],
                             files={"app_data.txt": code.encode()})

    first = await builder.ensure(manifest("v0"))

    async def unchanged(_: int) -> None:
        assert not (await builder.ensure(manifest("v0"))).built

    async def code_only(i: int) -> None:
        assert (await builder.ensure(manifest(f"bench-{time.time_ns()}-{i}"))).built

    backend = DockerBackend(client, data_dir=root / "svc",
                            plan_for=lambda spec: ContainerPlan(first.tag))

    async def cold_start(i: int) -> None:
        handle = await backend.start(spec_for(f"bench-{i}"), RecordingEvents())
        async with httpx.AsyncClient() as http:
            (await http.post(f"{handle.url}/", json={})).raise_for_status()
        asyncio.get_running_loop().call_soon(asyncio.ensure_future, backend.stop(handle))

    rows = [("unchanged rebuild (no docker build)", await _timed(runs, unchanged)),
            ("code-only rebuild", await _timed(runs, code_only)),
            ("container cold start -> first response", await _timed(runs, cold_start))]
    await backend.close()
    return rows


def _bench_service(root: Path, runs: int) -> list[tuple[str, list[float]]]:
    """Through the service: an unchanged redeploy keeps the warm container (the fleet adopts
    it), while a redeploy that changes an option (its image already built) replaces it, so
    the next request is a container cold start through the gateway."""
    svc = ServiceProcess(root / "svc-data", ["--runtime", "docker"]).start()
    bundles = [make_bundle(app_name="bench-echo", tmp_dir=root, options={"keep_alive": 300 + i})
               for i in (0, 1)]  # fmt: skip
    rows: dict[str, list[float]] = {name: [] for name in _SERVICE_ROWS}
    try:
        with svc.client() as http:
            owner = http.get("/v1/whoami").json()["owner"]
            for bundle in bundles:  # build both images first: not counted
                _deploy_then_call(http, bundle, owner)
            current = 1  # the bundle deployed last
            for _ in range(runs):
                unchanged = _deploy_then_call(http, bundles[current], owner)
                current = 1 - current
                changed = _deploy_then_call(http, bundles[current], owner)
                for name, ms in zip(_SERVICE_ROWS, (*unchanged, *changed), strict=True):
                    rows[name].append(ms)
    finally:
        svc.stop()
    return list(rows.items())


_SERVICE_ROWS = (
    "service: unchanged redeploy (runner kept)",
    "service: first request after it (warm)",
    "service: redeploy, one option changed",
    "service: first request (container cold)",
)


def _deploy_then_call(http: Any, bundle: Any, owner: str) -> tuple[float, float]:
    """(deploy ms, first request ms); the deploy must not build an image."""
    began = time.perf_counter()
    events = list(deploy(http, bundle, strategy="recreate"))
    assert events[-1]["event"] == "done", events[-1]
    middle = time.perf_counter()
    http.post(f"/{owner}/bench-echo", json={"text": "x"}).raise_for_status()
    return (middle - began) * 1000, (time.perf_counter() - middle) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = asyncio.run(_bench(Path(tmp), args.runs))
        rows += _bench_service(Path(tmp), args.runs)
    print(f"{'figure':<42}{'p50 ms':>10}{'min ms':>10}{'max ms':>10}")
    for name, times in rows:
        print(f"{name:<42}{statistics.median(times):>10.1f}{min(times):>10.1f}"
              f"{max(times):>10.1f}")


if __name__ == "__main__":
    main()
