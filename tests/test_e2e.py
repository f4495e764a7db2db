"""End to end: the `fal` CLI in subprocesses against the real service and real runners.

Each test writes a small project into tmp, runs `fal run` / `fal deploy` as a user would
(FALCLI_HOME in tmp, FAL_SERVER_URL + FAL_KEY pointing at the conftest service), and checks
the outcome over HTTP and through the CLI's own list commands.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from service_helpers import ServiceProcess, leftover_processes, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from falcli.cli.main import main; main()"]

APP_SOURCE = """
import os
import fal
from pydantic import BaseModel


class Msg(BaseModel):
    text: str


class {cls}(fal.App):
    keep_alive = 60

    def setup(self) -> None:
        if os.environ.get("NEVER_SET_IN_TESTS") is None and {crash}:
            raise RuntimeError("setup exploded on purpose")
        print("setup finished", flush=True)

    @fal.endpoint("/")
    def run(self, msg: Msg) -> Msg:
        return Msg(text="echo: " + msg.text)
"""


def make_project(
    root: Path, key: str, *, cls: str = "Echo", crash: bool = False,
    requirements: list[str] | None = None, auth: str | None = None,
) -> Path:  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    (root / "app.py").write_text(APP_SOURCE.format(cls=cls, crash=crash))
    extra = f"requirements = {json.dumps(requirements)}\n" if requirements is not None else ""
    extra += f'auth = "{auth}"\n' if auth else ""
    (root / "pyproject.toml").write_text(
        f'[project]\nname = "p-{key}"\nversion = "0.1.0"\n\n'
        f'[tool.fal.apps.{key}]\nref = "app.py::{cls}"\n{extra}'
    )
    return root


def cli_env(tmp_path: Path, svc: ServiceProcess | None, key: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAL_", "FALCLI_"))}
    env.update(FALCLI_HOME=str(tmp_path / "falcli-home"), COLUMNS="100")
    # the repo first on sys.path: user code does `import fal`, the shim package lives there
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if svc is not None:
        env.update(FAL_SERVER_URL=svc.url, FAL_KEY=key or svc.admin_key)
    return env


def fal(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 240) -> Any:
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def fal_json(args: list[str], cwd: Path, env: dict[str, str]) -> Any:
    proc = fal([*args, "--json"], cwd, env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


class Running:
    """`fal run` in the background; its stdout lines are read by a thread into a queue."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [*CLI, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._pump(self.proc.stdout, self.lines.put)
        self._pump(self.proc.stderr, self.stderr.append)

    @staticmethod
    def _pump(stream: IO[str], sink: Any) -> None:
        threading.Thread(target=lambda: [sink(line) for line in stream], daemon=True).start()

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2).strip()
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        raise AssertionError(f"no {prefix!r} line from fal run:\n{''.join(self.stderr)}")

    def finish(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def test_run_serves_then_sigint_deletes_the_app(
    tmp_path: Path, module_service: ServiceProcess
) -> None:
    svc = module_service
    project = make_project(tmp_path / "proj", "runme")
    env = cli_env(tmp_path, svc)
    running = Running(["run", "runme", "--app-name", "runme-dev"], project, env)
    try:
        sync_url = running.wait_for_line("sync:", timeout=180)
        resp = httpx.post(sync_url, json={"text": "hi"}, timeout=60)  # public: no key needed
        assert resp.status_code == 200 and resp.json() == {"text": "echo: hi"}
        pids = [r["pid"] for r in fal_json(["runners", "list", "--app", "runme-dev"], project, env)
                ["runners"] if r.get("pid")]  # fmt: skip
        assert pids, "a runner served the request"
    finally:
        running.proc.send_signal(signal.SIGINT)
    assert running.finish(timeout=60) == 0, "".join(running.stderr)
    names = [a["name"] for a in fal_json(["apps", "list"], project, env)["apps"]]
    assert "runme-dev" not in names
    wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), 20, "runners to exit")


def test_deploy_twice_gives_two_revisions_and_private_needs_a_key(
    tmp_path: Path, module_service: ServiceProcess
) -> None:
    svc = module_service
    project = make_project(tmp_path / "proj", "twice")
    env = cli_env(tmp_path, svc)
    first = fal(["deploy", "twice", "-m", "one"], project, env)
    assert first.returncode == 0, first.stderr
    second = fal(["deploy", "twice", "-m", "two"], project, env)
    assert second.returncode == 0, second.stderr
    revisions = fal_json(["apps", "revisions", "twice"], project, env)["revisions"]
    assert sorted(r["message"] for r in revisions) == ["one", "two"]
    assert len({r["id"] for r in revisions}) == 2
    sync_url = next(line.split(":", 1)[1].strip() for line in second.stdout.splitlines()
                    if line.strip().startswith("sync:"))  # fmt: skip
    refused = httpx.post(sync_url, json={"text": "x"}, timeout=60)
    assert refused.status_code == 401  # deploy defaults to private
    ok = httpx.post(sync_url, json={"text": "x"}, timeout=120,
                    headers={"Authorization": f"Key {svc.admin_key}"})  # fmt: skip
    assert ok.status_code == 200 and ok.json() == {"text": "echo: x"}


def test_run_beside_a_deployed_app_of_the_same_name_runs_as_name_run(
    tmp_path: Path, module_service: ServiceProcess
) -> None:
    svc = module_service
    project = make_project(tmp_path / "proj", "both")
    env = cli_env(tmp_path, svc)
    deployed = fal(["deploy", "both", "--json"], project, env)
    assert deployed.returncode == 0, deployed.stderr
    assert json.loads(deployed.stdout)["urls"]["sync"].endswith("/both")
    running = Running(["run", "both"], project, env)
    try:
        sync_url = running.wait_for_line("sync:", timeout=180)
        assert sync_url.endswith("/both-run")
        assert httpx.post(sync_url, json={"text": "r"}, timeout=60).json() == {"text": "echo: r"}
    finally:
        running.proc.send_signal(signal.SIGINT)
    assert running.finish(timeout=60) == 0, "".join(running.stderr)
    assert "running this one as 'both-run'" in "".join(running.stderr)
    names = {a["name"] for a in fal_json(["apps", "list"], project, env)["apps"]}
    assert "both" in names and "both-run" not in names


def test_setup_failure_shows_traceback_and_exits_3_quickly(
    tmp_path: Path, module_service: ServiceProcess
) -> None:
    project = make_project(tmp_path / "proj", "crashy", crash=True)
    env = cli_env(tmp_path, module_service)
    fal(["deploy", "crashy", "--app-name", "warmup-crashy"], project, env)  # env build, untimed
    started = time.monotonic()
    proc = fal(["run", "crashy"], project, env, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 3, proc.stderr
    assert "setup exploded on purpose" in proc.stderr and "Traceback" in proc.stderr
    assert elapsed < 30, f"setup failure took {elapsed:.1f}s to report"
    names = [a["name"] for a in fal_json(["apps", "list"], project, env)["apps"]]
    assert "crashy" not in names


def test_bad_requirement_fails_cleanly_without_a_revision(
    tmp_path: Path, module_service: ServiceProcess
) -> None:
    bad = "falcli-e2e-no-such-package-zz==9.9.9"
    project = make_project(tmp_path / "proj", "badreq", requirements=[bad])
    env = cli_env(tmp_path, module_service)
    proc = fal(["deploy", "badreq"], project, env)
    assert proc.returncode == 3, proc.stderr
    assert "falcli-e2e-no-such-package-zz" in proc.stderr  # uv's own message is shown
    assert "build_failed" in proc.stderr
    gone = fal(["apps", "revisions", "badreq"], project, env)
    assert gone.returncode == 1 or json.loads(gone.stdout or "{}").get("revisions") in ([], None)


def test_same_requirements_share_one_environment(
    tmp_path: Path, module_service: ServiceProcess
) -> None:
    env = cli_env(tmp_path, module_service)
    keys = []
    for name, cls in (("share-a", "AppA"), ("share-b", "AppB")):
        project = make_project(tmp_path / name, name, cls=cls, requirements=["anyio"])
        proc = fal(["deploy", name], project, env)
        assert proc.returncode == 0, proc.stderr
        revisions = fal_json(["apps", "revisions", name], project, env)["revisions"]
        keys.append(revisions[-1]["env_key"])
    assert keys[0] == keys[1] and keys[0]


def test_embedded_server_starts_on_first_use_and_stops(tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj", "embedded")
    env = cli_env(tmp_path, None)  # nothing configured: no URL, no key
    home = Path(env["FALCLI_HOME"])
    try:
        deployed = fal(["deploy", "embedded"], project, env)
        assert deployed.returncode == 0, deployed.stderr + _log(home)
        status = fal_json(["server", "status"], project, env)
        assert status["up"] is True and status["source"] == "embedded"
        assert status["url"].startswith("http://127.0.0.1:") and status["pid"]
        os.kill(status["pid"], signal.SIGKILL)  # a dead recorded server is replaced
        wait_until(lambda: not Path(f"/proc/{status['pid']}/cmdline").exists(), 20, "the kill")
        listed = fal_json(["apps", "list"], project, env)["apps"]
        assert [a["name"] for a in listed] == ["embedded"]  # same data dir, new process
        restarted = fal_json(["server", "status"], project, env)
        assert restarted["up"] is True and restarted["pid"] != status["pid"]
    finally:
        stopped = fal(["server", "stop"], project, env, timeout=60)
    assert stopped.returncode == 0 and "Stopped" in stopped.stdout, stopped.stderr
    assert not Path(f"/proc/{restarted['pid']}/cmdline").exists()
    wait_until(lambda: not leftover_processes(home / "server"), 20, "runners to exit")
    assert fal(["server", "status"], project, env).returncode == 3


def _log(home: Path) -> str:
    path = home / "server" / "server.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""
