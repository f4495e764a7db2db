"""Runner cold start: a direct spawn vs a fork from the env's zygote, in one run.

Run: ``python bench/bench_coldstart.py [--runs 10] [--python ENV_PYTHON]``.

Builds a real uv env (or uses ``--python``), pickles a tiny SDK app, then through the real
``LocalBackend`` measures, ``--runs`` times per mode, ``start()`` -> IDLE and ``start()`` ->
first response (one keep-alive-less ``POST /`` from a client created beforehand), stopping
each runner before the next. Zygote mode is prewarmed (as the service does after an env
build); the zygote's own start-up is printed separately. One warm-up start per mode is not
counted (bytecode caches, as for any second start of an app).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from runtime_helpers import OWN_PYTHON, pickle_app  # noqa: E402

from buildsvc.builder.env import EnvBuilder  # noqa: E402
from buildsvc.runtime.base import RunnerSpec, RunnerState  # noqa: E402
from buildsvc.runtime.local import LocalBackend  # noqa: E402

_APP = """
import fal

class Tiny(fal.App):
    @fal.endpoint("/")
    def hello(self, name: str = "world") -> dict:
        return {"hello": name}
"""


class _Quiet:
    def on_state(self, runner_id: str, state: RunnerState, detail: str = "") -> None:
        return None

    def on_log(self, runner_id: str, stream: str, line: str) -> None:
        return None


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


async def _once(backend: LocalBackend, spec: RunnerSpec, client: httpx.AsyncClient
                ) -> tuple[float, float]:
    began = time.perf_counter()
    handle = await backend.start(spec, _Quiet())
    idle = time.perf_counter() - began
    (await client.post(handle.url + "/", json={})).raise_for_status()
    first = time.perf_counter() - began
    await backend.stop(handle)
    return idle, first


async def _mode(use_zygote: bool, spec: RunnerSpec, runs: int
                ) -> tuple[list[float], list[float], float]:
    backend = LocalBackend(use_zygote=use_zygote)
    began = time.perf_counter()
    await backend.prewarm(spec.python)
    prewarm = time.perf_counter() - began
    idles, firsts = [], []
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        await _once(backend, spec, client)  # warm-up, not counted
        for _ in range(runs):
            idle, first = await _once(backend, spec, client)
            idles.append(idle)
            firsts.append(first)
    await backend.close()
    return idles, firsts, prewarm


async def _main(runs: int, python: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-coldstart-") as tmp_name:
        tmp = Path(tmp_name)
        if python is None:
            builder = EnvBuilder(tmp / "envs", blob_path=lambda sha: tmp / sha)
            python = (await builder.ensure(OWN_PYTHON, [])).python
        spec = RunnerSpec("bench", "tiny", "rev", python=python, workdir=tmp,
                          payload=pickle_app(tmp / "bundle", _APP, "Tiny"), grace_period=5.0)
        rows = {"direct spawn": await _mode(False, spec, runs),
                "zygote fork": await _mode(True, spec, runs)}
    _print(rows, runs)


def _print(rows: dict[str, tuple[list[float], list[float], float]], runs: int) -> None:
    print(f"runner cold start, {runs} runs each (ms)")
    print(f"{'mode':<14}{'idle p50':>10}{'idle p90':>10}{'first p50':>11}{'first p90':>11}"
          f"{'first min':>11}")
    for name, (idles, firsts, _) in rows.items():
        print(f"{name:<14}{_pct(idles, .5):>10.1f}{_pct(idles, .9):>10.1f}"
              f"{_pct(firsts, .5):>11.1f}{_pct(firsts, .9):>11.1f}{min(firsts) * 1000:>11.1f}")
    direct, zygote = (statistics.median(r[1]) for r in rows.values())
    print(f"ratio (direct / zygote, first-response median): {direct / zygote:.1f}x")
    print(f"zygote start-up (prewarm, paid once per env): {rows['zygote fork'][2] * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--python", type=Path, default=None,
                        help="an existing env interpreter (default: build a fresh uv env)")
    args = parser.parse_args()
    asyncio.run(_main(args.runs, args.python))


if __name__ == "__main__":
    main()
