"""The Docker runtime through the real service: `python -m buildsvc --runtime docker`, the
`fal` CLI in subprocesses, real images on a real engine, requests through the gateway.

Apps carry a fresh ``mark`` so their payload (hence image tag) is new on every run: the first
deploy really builds (only the code layers, the rest comes from the engine's layer cache).
"""

from __future__ import annotations

import json
import re
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker_helpers
import httpx
import pytest
from docker_helpers import cli_env, containers_of, fal_cli, write_project
from service_helpers import ServiceProcess, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

docker_client = docker_helpers.docker_client  # module fixture: a live engine + base images

APP = """
import os
import time
from pathlib import Path

import fal
from pydantic import BaseModel


class Msg(BaseModel):
    text: str


class {cls}(fal.App):
    mark = "{mark}"
    keep_alive = 60
    requirements = {requirements}

    @fal.endpoint("/")
    def run(self, msg: Msg) -> dict:
        import six

        return {{"text": "echo: " + msg.text, "runner": os.environ.get("FAL_RUNNER_ID"),
                "six": six.__version__, "uid": os.getuid(), "cwd": os.getcwd()}}

    @fal.endpoint("/slow")
    def slow(self, msg: Msg) -> dict:
        marks = Path("/data/marks")
        marks.mkdir(exist_ok=True)
        (marks / os.environ["FAL_RUNNER_ID"]).write_text(msg.text)
        time.sleep(1.5)
        return {{"runner": os.environ["FAL_RUNNER_ID"]}}
"""


def _app(cls: str, requirements: list[str]) -> str:
    return APP.format(cls=cls, mark=uuid.uuid4().hex, requirements=json.dumps(requirements))


def _owner(svc: ServiceProcess) -> str:
    with svc.client() as http:
        return str(http.get("/v1/whoami").json()["owner"])


def _post(svc: ServiceProcess, path: str, body: Any, method: str = "POST") -> httpx.Response:
    with svc.client(timeout=120) as http:
        return http.request(method, f"/{_owner(svc)}/{path}", json=body)


def _image_line(stderr: str) -> str:
    found = re.search(r"image (fal-app:[0-9a-f]{40}) (built|is up to date: no build)", stderr)
    assert found, f"no image line in the deploy output:\n{stderr[-3000:]}"
    return found.group(0)


def _stopped_clean(svc: ServiceProcess, client: Any, app: str) -> None:
    svc.stop()
    wait_until(lambda: not containers_of(client, app), 20, f"{app}'s containers to go")


def test_requirements_app_builds_an_image_serves_and_redeploys_without_a_build(
        service_factory: Callable[..., ServiceProcess], docker_client: Any,
        tmp_path: Path) -> None:
    svc = service_factory("--runtime", "docker")
    project = write_project(tmp_path / "p", "dock-echo", "DockEcho",
                            _app("DockEcho", ["six==1.16.0"]))
    env = cli_env(tmp_path / "home", svc)
    first = fal_cli(["deploy", "dock-echo"], project, env)
    assert first.returncode == 0, first.stderr
    built = _image_line(first.stderr)
    assert built.endswith(" built") and "Step " in first.stderr  # streamed build log
    answer = _post(svc, "dock-echo", {"text": "hi"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["text"] == "echo: hi" and body["six"] == "1.16.0"
    assert body["uid"] == 10001 and body["cwd"] == "/app"  # in the container, not root
    (container,) = containers_of(docker_client, "dock-echo")
    tag = built.split()[1]
    assert tag in container.image.tags and container.labels["fal.runner"] == body["runner"]

    again = fal_cli(["deploy", "dock-echo"], project, env)
    assert again.returncode == 0, again.stderr
    assert _image_line(again.stderr) == f"image {tag} is up to date: no build"
    assert "Step " not in again.stderr  # no `docker build` at all
    assert _post(svc, "dock-echo", {"text": "again"}).json()["text"] == "echo: again"
    _stopped_clean(svc, docker_client, "dock-echo")


def test_build_failure_names_the_failing_step_through_the_cli(
        service_factory: Callable[..., ServiceProcess], docker_client: Any,
        tmp_path: Path) -> None:
    svc = service_factory("--runtime", "docker")
    project = write_project(tmp_path / "p", "dock-bad", "DockBad",
                            _app("DockBad", ["no-such-pkg-fal-xyz-123==9.9"]))
    failed = fal_cli(["deploy", "dock-bad"], project, cli_env(tmp_path / "home", svc))
    assert failed.returncode == 3, failed.stderr
    assert "build_failed" in failed.stderr
    assert "failing step: Step" in failed.stderr and "uv pip install" in failed.stderr
    assert "no-such-pkg-fal-xyz-123" in failed.stderr  # the step's own output
    with svc.client() as http:
        assert http.get("/v1/apps/dock-bad").status_code == 404  # no revision, no app


DOCKERFILE = """\
FROM fal-base-cpu:bookworm
COPY greeting.txt /srv/greeting.txt
WORKDIR /srv
"""
IMAGE_APP = """
import os
from pathlib import Path

import fal


class DockFile(fal.App):
    mark = "{mark}"
    image = fal.ContainerImage.from_dockerfile_str({dockerfile!r})

    @fal.endpoint("/")
    def read(self) -> dict:
        return {{"greeting": Path("greeting.txt").read_text(), "cwd": os.getcwd(),
                "uid": os.getuid()}}
"""


def test_dockerfile_app_on_the_local_runtime_runs_in_a_container(
        service_factory: Callable[..., ServiceProcess], docker_client: Any,
        tmp_path: Path) -> None:
    svc = service_factory()  # --runtime local: an app with an image still gets one
    source = IMAGE_APP.format(mark=uuid.uuid4().hex, dockerfile=DOCKERFILE)
    project = write_project(tmp_path / "p", "dock-file", "DockFile", source,
                            files={"greeting.txt": "hola from the bundle"})
    deployed = fal_cli(["deploy", "dock-file"], project, cli_env(tmp_path / "home", svc))
    assert deployed.returncode == 0, deployed.stderr
    assert _image_line(deployed.stderr).endswith(" built")
    answer = _post(svc, "dock-file", {})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"greeting": "hola from the bundle", "cwd": "/srv", "uid": 10001}
    assert len(containers_of(docker_client, "dock-file")) == 1
    _stopped_clean(svc, docker_client, "dock-file")


EXPOSED_APP = """
import json
from http.server import BaseHTTPRequestHandler, HTTPServer

import fal

OPENAPI = {{"openapi": "3.1.0", "info": {{"title": "direct", "version": "1"}},
           "paths": {{"/v1/items/{{id}}": {{"get": {{}}}}}}}}


class Handler(BaseHTTPRequestHandler):
    def _answer(self):
        size = int(self.headers.get("Content-Length") or 0)
        raw = json.dumps({{"method": self.command, "path": self.path,
                          "body": self.rfile.read(size).decode()}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_POST = do_PUT = do_DELETE = _answer


@fal.function(exposed_port={port}, image=fal.ContainerImage.from_dockerfile_str(
    "FROM fal-base-cpu:bookworm\\n"), metadata={{"openapi": OPENAPI}})
def direct():
    HTTPServer(("127.0.0.1", {port}), Handler).serve_forever()
"""


def test_exposed_port_function_gets_every_path_and_method(
        service_factory: Callable[..., ServiceProcess], docker_client: Any,
        tmp_path: Path) -> None:
    svc = service_factory("--runtime", "docker")
    port = _free_port()
    project = write_project(tmp_path / "p", "dock-direct", "direct",
                            EXPOSED_APP.format(port=port))
    deployed = fal_cli(["deploy", "dock-direct"], project, cli_env(tmp_path / "home", svc))
    assert deployed.returncode == 0, deployed.stderr
    got = _post(svc, "dock-direct/v1/items/7?q=a%20b", None, method="GET")
    assert got.status_code == 200, got.text
    assert got.json() == {"method": "GET", "path": "/v1/items/7?q=a%20b", "body": ""}
    put = _post(svc, "dock-direct/anything", {"x": 1}, method="PUT").json()
    assert put == {"method": "PUT", "path": "/anything", "body": '{"x":1}'}
    assert _post(svc, "dock-direct/", None, method="DELETE").json()["method"] == "DELETE"
    with svc.client() as http:
        (rev,) = http.get("/v1/apps/dock-direct/revisions").json()["revisions"]
    assert rev["kind"] == "function"
    assert list(_recorded_openapi(svc, rev["id"])["paths"]) == ["/v1/items/{id}"]
    _stopped_clean(svc, docker_client, "dock-direct")


def _recorded_openapi(svc: ServiceProcess, revision_id: str) -> Any:
    import sqlite3

    with sqlite3.connect(svc.data_dir / "service.db") as db:
        (manifest,) = db.execute("SELECT manifest FROM revisions WHERE id = ?",
                                 (revision_id,)).fetchone()
    return json.loads(manifest)["openapi"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_queue_retries_a_request_whose_container_was_killed(
        service_factory: Callable[..., ServiceProcess], docker_client: Any,
        tmp_path: Path) -> None:
    svc = service_factory("--runtime", "docker")
    project = write_project(tmp_path / "p", "dock-slow", "DockSlow",
                            _app("DockSlow", ["six==1.16.0"]))
    deployed = fal_cli(["deploy", "dock-slow"], project, cli_env(tmp_path / "home", svc))
    assert deployed.returncode == 0, deployed.stderr
    marks = svc.data_dir / "data" / "marks"
    with svc.client(timeout=60) as http:
        sub = http.post(f"/queue/{_owner(svc)}/dock-slow/slow", json={"text": "x"}).json()
        (first,) = wait_until(lambda: _marked(marks), 60, "the first attempt to reach a runner")
        docker_client.containers.get(f"fal-runner-{first}").kill()  # SIGKILL mid-request

        def completed() -> Any:
            status = http.get(sub["status_url"]).json()
            return status if status["status"] == "COMPLETED" else None

        wait_until(completed, 90, "the retried request to complete")
        result = http.get(sub["response_url"])
    assert result.status_code == 200, result.text
    second = result.json()["runner"]
    assert second != first and set(_marked(marks)) == {first, second}
    _stopped_clean(svc, docker_client, "dock-slow")


def _marked(marks: Path) -> list[str]:
    return [p.name for p in marks.iterdir()] if marks.is_dir() else []


def test_image_app_without_an_engine_fails_the_deploy_naming_the_fix(
        service_factory: Callable[..., ServiceProcess], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    svc = service_factory()
    source = IMAGE_APP.format(mark="x", dockerfile=DOCKERFILE)
    project = write_project(tmp_path / "p", "dock-none", "DockFile", source,
                            files={"greeting.txt": "hi"})
    failed = fal_cli(["deploy", "dock-none"], project, cli_env(tmp_path / "home", svc))
    assert failed.returncode == 3
    assert "engine_unavailable" in failed.stderr and "no Docker engine answers" in failed.stderr
    assert "scripts/docker-setup.sh" in failed.stderr


def test_docker_runtime_without_an_engine_refuses_to_start(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    with pytest.raises(AssertionError, match="no Docker engine answers") as failure:
        ServiceProcess(tmp_path / "data", ["--runtime", "docker"]).start()
    assert "--runtime local" in str(failure.value)


def test_proxy_template_serves_through_its_own_server(
        service_factory: Callable[..., ServiceProcess], tmp_path: Path) -> None:
    from falcli.scaffold import create_app, list_templates

    assert "proxy" in list_templates()
    svc = service_factory()  # proxy app mode needs no image: the local runtime runs it
    create_app(tmp_path / "p", "proxied", "proxy")
    deployed = fal_cli(["deploy", "proxied"], tmp_path / "p", cli_env(tmp_path / "home", svc))
    assert deployed.returncode == 0, deployed.stderr
    answer = _post(svc, "proxied", {"text": "through the proxy"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"text": "THROUGH THE PROXY", "server_path": "/upper"}
