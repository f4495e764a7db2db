"""Platform latency in one run: cold vs warm requests, unchanged `fal deploy` vs `fal --help`.

    python bench/bench_platform.py [--repeat N]

Starts its own service (``python -m buildsvc --port 0``, data in a temp dir), writes a small
project, deploys two copies of one app through the real CLI (``bench-warm`` keeps its runner,
``bench-cold`` lets it go after 1 s), then measures:

- cold start: request -> response with no runner alive (the environment is cached);
- warm request: request -> response on an idle runner;
- unchanged ``fal deploy`` (blobs and environment cached) and ``fal --help``, as processes.

Medians of ``--repeat`` runs are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from falcli.cli.main import main; main()"]
FAL_SCRIPT = Path(sys.executable).with_name("fal")

APP = """
import fal
from pydantic import BaseModel


class Msg(BaseModel):
    text: str


class Bench(fal.App):
    keep_alive = {keep_alive}

    @fal.endpoint("/")
    def run(self, msg: Msg) -> Msg:
        return Msg(text=msg.text)
"""


def start_service(data_dir: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    ready = data_dir.parent / "ready.json"
    log = open(data_dir.parent / "service.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "buildsvc", "--port", "0", "--data-dir", str(data_dir),
         "--ready-file", str(ready)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait(lambda: ready.exists() or proc.poll() is not None, 60, "the service to be ready")
    info = json.loads(ready.read_text())
    key = Path(info["admin_key_file"]).read_text().strip()
    return proc, {"url": info["url"], "key": key}


def wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)


def write_project(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "warm.py").write_text(APP.format(keep_alive=600))
    (root / "cold.py").write_text(APP.format(keep_alive=1))
    (root / "pyproject.toml").write_text(
        '[project]\nname = "bench"\nversion = "0.1.0"\n\n'
        '[tool.fal.apps.bench-warm]\nref = "warm.py::Bench"\nauth = "public"\n\n'
        '[tool.fal.apps.bench-cold]\nref = "cold.py::Bench"\nauth = "public"\n'
    )


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_cli(args: list[str], cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"fal {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")


def runners(client: httpx.Client, app: str) -> list[dict[str, object]]:
    found = client.get("/v1/runners", params={"app": app}).json()["runners"]
    return [r for r in found if r.get("state") not in ("TERMINATED", "FAILED")]


# One client for every call: a new httpx client per call costs more (SSL context, connection)
# than the request itself and would hide what the platform does.
_CALLER = httpx.Client(timeout=120)


def call(url: str) -> None:
    resp = _CALLER.post(url, json={"text": "x"})
    resp.raise_for_status()


def measure(repeat: int, work: Path) -> list[tuple[str, list[float]]]:
    proc, svc = start_service(work / "data")
    try:
        return _measure(repeat, work, svc)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _measure(repeat: int, work: Path, svc: dict[str, str]) -> list[tuple[str, list[float]]]:
    project = work / "project"
    write_project(project)
    env = {**os.environ, "FALCLI_HOME": str(work / "home"), "FAL_SERVER_URL": svc["url"],
           "FAL_KEY": svc["key"], "PYTHONPATH": str(REPO)}  # fmt: skip
    run_cli(["deploy", "bench-warm"], project, env)  # builds the environment once
    run_cli(["deploy", "bench-cold"], project, env)
    admin = httpx.Client(base_url=svc["url"], headers={"Authorization": f"Key {svc['key']}"})
    owner = admin.get("/v1/whoami").json()["owner"]
    warm_url, cold_url = (f"{svc['url']}/{owner}/bench-{k}" for k in ("warm", "cold"))
    call(warm_url)  # the warm app now has an idle runner
    cold, warm = [], []
    for _ in range(repeat):
        wait(lambda: not runners(admin, "bench-cold"), 60, "bench-cold's runner to go away")
        cold.append(timed(lambda: call(cold_url)))
        warm += [timed(lambda: call(warm_url)) for _ in range(10)]
    deploy = [timed(lambda: run_cli(["deploy", "bench-warm"], project, env))
              for _ in range(repeat)]  # fmt: skip
    helps = [timed(lambda: subprocess.run([str(FAL_SCRIPT), "--help"], capture_output=True))
             for _ in range(max(repeat, 5))]  # fmt: skip
    return [("cold start (no runner, env cached)", cold), ("warm request", warm),
            ("unchanged `fal deploy`", deploy), ("`fal --help`", helps)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="runs per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fal-bench-") as tmp:
        rows = measure(args.repeat, Path(tmp))
    table = Table(title="fal platform latency (seconds)")
    for column in ("measurement", "median", "min", "max", "n"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    for name, samples in rows:
        table.add_row(name, f"{statistics.median(samples):.3f}", f"{min(samples):.3f}",
                      f"{max(samples):.3f}", str(len(samples)))  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
