"""The CLI by invocation: help, exit codes, JSON / table output, messages on stderr.

Commands run in-process through ``run_cli`` at a fixed width (COLUMNS=100), with the service
answered by an ``httpx.MockTransport`` (the CLI's test seam); deploy / run against the real
service are in tests/test_e2e*.py. ``FALCLI_HOME`` always points into tmp.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from falcli.cli.errors import exit_code_for
from falcli.cli.main import run_cli
from falcli.errors import (
    AuthError,
    ConfigError,
    InternalError,
    NotFoundError,
    PackagingError,
    ServerError,
    ServiceUnavailable,
)

Handler = Callable[[httpx.Request], httpx.Response]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        "FALCLI_HOME": str(tmp_path / "home"),
        "FAL_SERVER_URL": "http://svc.test",
        "FAL_KEY": "kid:secret",
        "COLUMNS": "100",
        "FAL_KEY_ID": "",
        "FAL_KEY_SECRET": "",
    }


def invoke(argv: list[str], env: dict[str, str], handler: Handler | None = None) -> Result:
    transport = httpx.MockTransport(handler) if handler else None
    with CliRunner().isolation(env=env) as (out, err, _):
        code = run_cli(argv, transport=transport)
        sys.stdout.flush()
        sys.stderr.flush()
        return Result(code, out.getvalue().decode(), err.getvalue().decode())


def answer(status: int, body: object) -> Handler:
    return lambda request: httpx.Response(status, json=body)


APPS = {
    "apps": [
        {
            "name": "demo",
            "owner": "alice",
            "auth": "private",
            "revision": "r1",
            "ephemeral": False,
            "url": "http://svc.test/alice/demo",
            "runners": 1,
        }
    ]
}


def test_help_lists_commands_and_exit_codes(env: dict[str, str]) -> None:
    res = invoke(["--help"], env)
    assert res.code == 0
    for command in ("run", "deploy", "apps", "runners", "keys", "init", "create", "server"):
        assert f"  {command} " in res.stdout
    assert "4 auth" in res.stdout and "130 interrupted" in res.stdout


def test_help_keeps_rich_and_httpx_off_the_import_path() -> None:
    code = (
        "import sys; from falcli.cli.main import run_cli; rc = run_cli(['--help']);"
        "bad = [m for m in ('rich', 'httpx', 'cloudpickle') if m in sys.modules];"
        "sys.exit(1 if bad or rc else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()


@pytest.mark.parametrize(
    "argv", [["bogus"], ["apps", "list", "--nope"], ["deploy", "--strategy", "x"]]
)
def test_usage_errors_exit_2(env: dict[str, str], argv: list[str]) -> None:
    res = invoke(argv, env)
    assert res.code == 2
    assert "Error:" in res.stderr and res.stdout == ""


def test_apps_list_json(env: dict[str, str]) -> None:
    res = invoke(["apps", "list", "--json"], env, answer(200, APPS))
    assert res.code == 0
    assert json.loads(res.stdout) == APPS


def test_apps_list_without_tty_is_plain_tab_separated(env: dict[str, str]) -> None:
    res = invoke(["apps", "list"], env, answer(200, APPS))
    lines = res.stdout.splitlines()
    assert lines[0].split("\t")[:3] == ["NAME", "OWNER", "AUTH"]
    assert lines[1].split("\t")[:4] == ["demo", "alice", "private", "r1"]
    assert "\x1b[" not in res.stdout  # no colour codes without a TTY


def test_runners_list_passes_the_app_filter(env: dict[str, str]) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"runners": [{"id": "r-1", "app": "demo", "pid": 7}]})

    res = invoke(["runners", "list", "--app", "demo", "--json"], env, handler)
    assert res.code == 0 and json.loads(res.stdout)["runners"][0]["pid"] == 7
    assert seen[0].url.params["app"] == "demo"


def test_revisions_table(env: dict[str, str]) -> None:
    body = {"revisions": [{"id": "rev-2", "created_at": 1.7e9, "message": "m", "env_key": "e1"}]}
    res = invoke(["apps", "revisions", "demo"], env, answer(200, body))
    assert res.code == 0 and "rev-2\t" in res.stdout and "\te1\tm" in res.stdout


def test_keys_create_shows_the_secret_once_and_warns(env: dict[str, str]) -> None:
    seen: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json={"key_id": "k2", "key": "k2:s3cr3t", "owner": "bob"})

    res = invoke(["keys", "create", "--owner", "bob", "--name", "ci"], env, handler)
    assert res.code == 0 and "k2:s3cr3t" in res.stdout and "shown only once" in res.stderr
    assert seen == [{"owner": "bob", "name": "ci", "admin": False}]


def test_not_found_exits_1_with_the_server_reason(env: dict[str, str]) -> None:
    res = invoke(["apps", "delete", "ghost"], env, answer(404, {"detail": "app 'ghost' not found"}))
    assert res.code == 1
    assert "app 'ghost' not found" in res.stderr and res.stdout == ""


def test_refused_key_exits_4(env: dict[str, str]) -> None:
    res = invoke(["keys", "list"], env, answer(401, {"detail": "unknown key id"}))
    assert res.code == 4 and "unknown key id" in res.stderr and "FAL_KEY" in res.stderr


def test_server_error_exits_3(env: dict[str, str]) -> None:
    res = invoke(["apps", "list"], env, answer(500, {"detail": "database is locked"}))
    assert res.code == 3 and "database is locked" in res.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_server_exits_3_naming_the_url(env: dict[str, str]) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    res = invoke(["--server", url, "apps", "list"], env)
    assert res.code == 3 and url in res.stderr and "fal server status" in res.stderr


def test_bad_server_url_is_a_user_error(env: dict[str, str]) -> None:
    res = invoke(["apps", "list"], {**env, "FAL_SERVER_URL": "localhost:8080"})
    assert res.code == 1 and "'localhost:8080' (from FAL_SERVER_URL)" in res.stderr


def test_server_status_when_nothing_runs_says_down_and_exits_3(env: dict[str, str]) -> None:
    local = {**env, "FAL_SERVER_URL": ""}
    res = invoke(["server", "status", "--json"], local)
    assert res.code == 3
    assert json.loads(res.stdout) == {
        "url": None,
        "pid": None,
        "version": None,
        "up": False,
        "source": "embedded",
    }


def test_server_stop_refuses_a_server_it_did_not_start(env: dict[str, str]) -> None:
    res = invoke(["server", "stop"], env)
    assert res.code == 1 and "did not start" in res.stderr


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ConfigError("x"), 1),
        (PackagingError("x"), 1),
        (NotFoundError("x"), 1),
        (ServerError("x"), 3),
        (ServiceUnavailable("x"), 3),
        (InternalError("x"), 3),
        (AuthError("x"), 4),
        (KeyboardInterrupt(), 130),
        (RuntimeError("bug"), 3),
    ],
)
def test_exit_code_table(exc: BaseException, code: int) -> None:
    assert exit_code_for(exc) == code


def test_console_script_exits_with_the_mapped_code(tmp_path: Path) -> None:
    env = {**os.environ, "FALCLI_HOME": str(tmp_path), "FAL_SERVER_URL": "nope"}
    proc = subprocess.run(
        [sys.executable, "-c", "from falcli.cli.main import main; main()", "apps", "list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1 and "expected an http:// or https:// URL" in proc.stderr


def test_init_names_the_app_after_the_directory(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "My_Project"
    root.mkdir()
    monkeypatch.chdir(root)
    res = invoke(["init"], env)
    assert res.code == 0, res.stderr
    assert "[tool.fal.apps.my-project]" in (root / "pyproject.toml").read_text()
    assert "Next: fal run my-project" in res.stdout


def test_create_app_twice_is_a_user_error_naming_force(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert invoke(["create", "app", "img-gen"], env).code == 0
    again = invoke(["create", "app", "img-gen"], env)
    assert again.code == 1 and "--force" in again.stderr
    assert invoke(["create", "app", "img-gen", "--force"], env).code == 0


FIXTURES = Path(__file__).parent / "fixtures" / "projects"


def test_deploy_of_a_broken_project_fails_before_contacting_the_server(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(FIXTURES / "broken" / "import-raises")
    contacted: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        contacted.append(request)
        return httpx.Response(500)

    res = invoke(["deploy", "crash"], env, handler)
    assert res.code == 1 and "crash" in res.stderr and "Traceback" in res.stderr
    assert contacted == []


def test_deploy_unknown_app_key_is_a_user_error(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(FIXTURES / "single")
    res = invoke(["deploy", "nope"], env)
    assert res.code == 1 and "nope" in res.stderr


def test_deploy_shows_project_warnings_build_log_and_urls(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(FIXTURES / "single")
    deploy_requests: list[dict[str, object]] = []
    done = {
        "event": "done",
        "app": {"name": "greeter", "owner": "alice"},
        "revision": {"id": "rev-9"},
        "urls": {
            "sync": "http://svc.test/alice/greeter",
            "queue": "http://svc.test/queue/alice/greeter",
        },
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/blobs/missing":
            return httpx.Response(200, json={"missing": []})
        deploy_requests.append(json.loads(request.content))
        events = [{"event": "log", "source": "build", "message": "Resolved 1 package"}, done]
        return httpx.Response(200, content="".join(json.dumps(e) + "\n" for e in events))

    res = invoke(["deploy", "greeter", "--strategy", "recreate"], env, handler)
    assert res.code == 0, res.stderr
    assert "no_scale" in res.stderr and "Resolved 1 package" in res.stderr
    assert "Deployed alice/greeter revision rev-9" in res.stdout
    assert "  sync: http://svc.test/alice/greeter" in res.stdout
    request = deploy_requests[0]
    assert (request["auth"], request["strategy"], request["ephemeral"]) == (
        "private",
        "recreate",
        False,
    )


def test_server_start_passes_the_limit_flags_to_the_service(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The service itself is not started: a real process that exits at once stands in for it,
    # and the real service parser reads the argv the CLI built.
    from buildsvc.__main__ import _parse
    from falcli.cli import server

    started: list[list[str]] = []
    real_popen = subprocess.Popen

    def popen(argv: list[str]) -> subprocess.Popen[bytes]:
        started.append(argv)
        return real_popen([sys.executable, "-c", "pass"])

    monkeypatch.setattr(server.subprocess, "Popen", popen)
    limits = ["--max-body-bytes", "1024", "--header-timeout", "2.5", "--rate-limit", "7",
              "--rate-burst", "3", "--max-queue-depth", "9"]  # fmt: skip
    res = invoke(["server", "start", "--data-dir", str(tmp_path / "d"), *limits], env)
    assert res.code == 0, res.stderr
    assert started and started[0][1:3] == ["-m", "buildsvc"]
    args = _parse(started[0][3:])
    assert (args.max_body_bytes, args.header_timeout, args.rate_limit, args.rate_burst,
            args.max_queue_depth) == (1024, 2.5, 7.0, 3, 9)  # fmt: skip
    plain = invoke(["server", "start", "--data-dir", str(tmp_path / "e")], env)
    assert plain.code == 0 and "--rate-limit" not in started[1]
