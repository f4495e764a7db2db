"""Images and container runners on a real Docker engine (see docs/docker.md).

Only the GPU is mocked (this engine has none): ``test_gpu_device_request`` records the
device request sent to the engine and strips it before the real ``create``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import docker_helpers
import httpx
import pytest
from docker_helpers import Blobs, make_manifest, spec_for
from runtime_helpers import RecordingEvents, pickle_app

from buildsvc.builder.dockerfile import RUNNER_UID
from buildsvc.builder.image import BuiltImage, ImageBuilder, ImageBuildError
from buildsvc.runtime.base import RunnerStartError
from buildsvc.runtime.docker import ContainerPlan, DockerBackend, container_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# Fixtures shared through the helper module (assigned, so pytest collects them here).
docker_client = docker_helpers.docker_client
image_builder = docker_helpers.image_builder
SECRET = "tok-5b1f0c9e-very-secret"


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return pickle_app(tmp_path_factory.mktemp("payload")).read_bytes()


@pytest.fixture(scope="module")
def app_image(image_builder: tuple[ImageBuilder, Blobs], payload: bytes) -> BuiltImage:
    builder, blobs = image_builder
    manifest = make_manifest(blobs, payload, requirements=[["six==1.16.0"]],
                             files={"data/hello.txt": b"v1"})
    return asyncio.run(builder.ensure(manifest))


def _backend(client: Any, tmp_path: Path, image: str, **kw: Any) -> DockerBackend:
    return DockerBackend(client, data_dir=tmp_path / "svc",
                         plan_for=lambda spec: ContainerPlan(image, **kw))


def _marks(backend: DockerBackend, runner_id: str) -> Path:
    marks = backend.shared_data / runner_id
    marks.mkdir(mode=0o777, exist_ok=True)
    os.chmod(marks, 0o777)
    return marks


def _wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_requirements_app_serves_and_follows_sigterm_lifecycle(
        docker_client: Any, app_image: BuiltImage, tmp_path: Path) -> None:
    backend = _backend(docker_client, tmp_path, app_image.tag)
    marks = _marks(backend, "life")
    events = RecordingEvents()

    async def scenario() -> tuple[int, float]:
        handle = await backend.start(spec_for("life", env={"MARKS": "/data/life"}), events)
        async with httpx.AsyncClient() as http:
            answer = await http.post(f"{handle.url}/", json={"name": "box"})
            assert answer.json()["hello"] == "box"
            assert (await http.get(f"{handle.url}/health")).status_code == 200
            slow = asyncio.create_task(http.post(f"{handle.url}/slow", json={"seconds": 1.0}))
            await asyncio.to_thread(_wait_for, (marks / "slow-started").exists, 10, "slow")
            began = time.monotonic()
            await backend.stop(handle)
            assert (await slow).json() == {"slept": 1.0}  # drained, not cut
        return await backend.wait(handle), time.monotonic() - began

    code, took = asyncio.run(scenario())
    assert code == 0 and took < 4.0  # well inside the 5 s grace: SIGTERM reached the agent
    assert events.state_names() == ["SETUP", "IDLE", "DRAINING", "TERMINATED"]
    assert (marks / "hooks").read_text() == "handle_exit TERMINATING\nteardown\n"
    assert "setup running" in events.log_text("stdout")
    assert not docker_client.containers.list(all=True, filters={"label": "fal.runner=life"})


def test_container_isolation_settings(docker_client: Any, app_image: BuiltImage,
                                      tmp_path: Path) -> None:
    backend = _backend(docker_client, tmp_path, app_image.tag, machine_type="S")

    async def scenario() -> dict[str, Any]:
        handle = await backend.start(spec_for("iso"), RecordingEvents())
        info = docker_client.api.inspect_container("fal-runner-iso")
        await backend.stop(handle)
        return dict(info)

    info = asyncio.run(scenario())
    host = info["HostConfig"]
    assert info["Config"]["User"] == f"{RUNNER_UID}:{RUNNER_UID}"
    assert host["CapDrop"] == ["ALL"] and host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Memory"] == 1024 * 1024 * 1024 and host["NanoCpus"] == 1_000_000_000
    assert host["PidsLimit"] == 4096 and host["NetworkMode"] == "host" and host["Init"]
    mounts = {m["Destination"]: m["Source"] for m in info["Mounts"]}
    assert mounts["/data"] == str(backend.shared_data)
    assert "/var/run/docker.sock" not in mounts and len(mounts) == 2


def test_unchanged_rebuild_does_not_call_build(image_builder: tuple[ImageBuilder, Blobs],
                                               payload: bytes, app_image: BuiltImage) -> None:
    builder, blobs = image_builder
    before = list(builder.build_calls)
    manifest = make_manifest(blobs, payload, requirements=[["six==1.16.0"]],
                             files={"data/hello.txt": b"v1"})
    again = asyncio.run(builder.ensure(manifest))
    assert again == BuiltImage(app_image.tag, app_image.image_id, built=False)
    assert builder.build_calls == before


def test_code_only_change_rebuilds_only_code_layers(
        image_builder: tuple[ImageBuilder, Blobs], payload: bytes,
        app_image: BuiltImage) -> None:
    builder, blobs = image_builder
    manifest = make_manifest(blobs, payload, requirements=[["six==1.16.0"]],
                             files={"data/hello.txt": b"v2"})
    log: list[str] = []
    built = asyncio.run(builder.ensure(manifest, log=log.append))
    assert built.built and built.tag != app_image.tag
    steps = [i for i, line in enumerate(log) if line.startswith("Step ") and " : FROM " not in line]
    rebuilt = [log[i] for i in steps if log[i + 1] != " ---> Using cache"]
    assert len(rebuilt) == 1 and rebuilt[0].endswith('COPY ["app", "/app"]'), rebuilt


def test_failing_requirement_names_the_step(image_builder: tuple[ImageBuilder, Blobs],
                                            payload: bytes) -> None:
    builder, blobs = image_builder
    manifest = make_manifest(blobs, payload, requirements=[["no-such-pkg-fal-xyz-123==9.9"]])
    lines: list[str] = []
    with pytest.raises(ImageBuildError) as failure:
        asyncio.run(builder.ensure(manifest, log=lines.append))
    assert "uv pip install" in failure.value.step and "RUN" in failure.value.step
    assert "no-such-pkg-fal-xyz-123" in failure.value.detail
    assert any("no-such-pkg-fal-xyz-123" in line for line in lines)  # streamed live


DOCKERFILE = """\
FROM fal-base-cpu:bookworm
ARG GREETING=unset
COPY greeting.txt /srv/greeting.txt
RUN --mount=type=secret,id=token echo "token is $(cat /run/secrets/token)" \\
    && sha256sum /run/secrets/token | cut -c1-16 > /srv/token.sha \\
    && echo "$GREETING" > /srv/arg.txt
WORKDIR /srv
"""
DOCKERFILE_APP = """
import fal
from pathlib import Path


class FileApp(fal.App):
    @fal.endpoint("/")
    def read(self) -> dict:
        return {"file": Path("greeting.txt").read_text(), "arg": Path("arg.txt").read_text(),
                "token_sha": Path("token.sha").read_text().strip()}
"""


def test_dockerfile_app_with_secret_and_build_args(
        docker_client: Any, image_builder: tuple[ImageBuilder, Blobs], tmp_path: Path) -> None:
    builder, blobs = image_builder
    payload = pickle_app(tmp_path / "p", DOCKERFILE_APP, "FileApp").read_bytes()
    image = {"dockerfile_str": DOCKERFILE, "build_args": {"GREETING": "hola"},
             "secrets": {"token": SECRET}, "registries": {}, "entrypoint": None, "cmd": None}
    manifest = make_manifest(blobs, payload, files={"greeting.txt": b"from the bundle"},
                             image=image)
    log: list[str] = []
    # no_cache: an earlier run may have left this image (its tag is its content hash).
    built = asyncio.run(builder.ensure(manifest, log=log.append, no_cache=True))
    assert any("token is ***" in line for line in log), "the echo is masked, not dropped"
    assert not any(SECRET in line for line in log)
    history = subprocess.run(["/usr/bin/docker", "history", "--no-trunc", built.tag],
                             capture_output=True, text=True, check=True).stdout
    assert SECRET not in history and "GREETING" in history
    backend = _backend(docker_client, tmp_path, built.tag)

    async def call() -> dict[str, Any]:
        handle = await backend.start(spec_for("dockerfile-app"), RecordingEvents())
        async with httpx.AsyncClient() as http:
            answer = (await http.post(f"{handle.url}/", json={})).json()
        await backend.stop(handle)
        return dict(answer)

    token_sha = hashlib.sha256(SECRET.encode()).hexdigest()[:16]  # it was there at build time
    assert asyncio.run(call()) == {"file": "from the bundle", "arg": "hola\n",
                                   "token_sha": token_sha}


def test_dockerfile_failure_shows_the_failing_step(
        image_builder: tuple[ImageBuilder, Blobs], payload: bytes) -> None:
    builder, blobs = image_builder
    text = "FROM fal-base-cpu:bookworm\nRUN echo about-to-fail && exit 3\n"
    image = {"dockerfile_str": text, "build_args": {}, "secrets": {}, "registries": {}}
    with pytest.raises(ImageBuildError) as failure:
        asyncio.run(builder.ensure(make_manifest(blobs, payload, image=image), no_cache=True))
    assert "RUN echo about-to-fail && exit 3" in failure.value.step
    assert "about-to-fail" in failure.value.detail and "exit code: 3" in failure.value.detail


def test_container_killed_mid_request_is_reported_exited(
        docker_client: Any, app_image: BuiltImage, tmp_path: Path) -> None:
    backend = _backend(docker_client, tmp_path, app_image.tag)
    marks = _marks(backend, "killed")
    events = RecordingEvents()

    async def scenario() -> tuple[int, BaseException | None]:
        handle = await backend.start(spec_for("killed", env={"MARKS": "/data/killed"}),
                                     events)
        async with httpx.AsyncClient() as http:
            slow = asyncio.create_task(http.post(f"{handle.url}/slow", json={"seconds": 30}))
            await asyncio.to_thread(_wait_for, (marks / "slow-started").exists, 10, "slow")
            docker_client.api.kill("fal-runner-killed")  # SIGKILL from outside
            code = await asyncio.wait_for(backend.wait(handle), 20)
            error = (await asyncio.gather(slow, return_exceptions=True))[0]
        return code, error if isinstance(error, BaseException) else None

    code, error = asyncio.run(scenario())
    assert code == 137 and isinstance(error, httpx.TransportError)
    assert events.states[-1][1] == "FAILED" and "exited with code 137" in events.states[-1][2]


def test_setup_failure_reports_traceback(docker_client: Any, app_image: BuiltImage,
                                         tmp_path: Path) -> None:
    backend = _backend(docker_client, tmp_path, app_image.tag)
    with pytest.raises(RunnerStartError) as failure:
        asyncio.run(backend.start(spec_for("bad", env={"FAIL_SETUP": "1"}), RecordingEvents()))
    assert "setup exploded on purpose" in failure.value.detail


class _RecordingClient:
    """The real client, except that GPU device requests are recorded and removed before the
    engine sees them: this engine has no GPU (the one thing mocked here)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.api = client.api
        self.containers = self
        self.sent: list[dict[str, Any]] = []

    def create(self, **config: Any) -> Any:
        self.sent.append(dict(config))
        config.pop("device_requests", None)
        return self._client.containers.create(**config)


def test_gpu_device_request_names_allocated_ids(docker_client: Any, app_image: BuiltImage,
                                                tmp_path: Path) -> None:
    recording = _RecordingClient(docker_client)
    backend = DockerBackend(recording, data_dir=tmp_path / "svc",
                            plan_for=lambda spec: ContainerPlan(app_image.tag, "GPU-H100"))

    async def call() -> dict[str, Any]:
        handle = await backend.start(spec_for("gpu", gpu_ids=[2, 5]), RecordingEvents())
        async with httpx.AsyncClient() as http:
            answer = (await http.post(f"{handle.url}/", json={})).json()
        await backend.stop(handle)
        return dict(answer)

    assert asyncio.run(call())["cuda"] == "0,1"  # renumbered inside the container
    (request,) = recording.sent[0]["device_requests"]
    assert request["Driver"] == "nvidia" and request["DeviceIDs"] == ["2", "5"]
    assert request["Capabilities"] == [["gpu"]]
    assert "mem_limit" not in recording.sent[0]  # GPU types are not CPU-sized


def test_container_config_sizes_cpu_machine_types(tmp_path: Path) -> None:
    config = container_config(spec_for("cfg"), ContainerPlan("img", "L"), tmp_path, tmp_path)
    assert config["nano_cpus"] == 4_000_000_000 and config["mem_limit"] == f"{15 * 1024}m"
    assert "device_requests" not in config and config["environment"]["CUDA_VISIBLE_DEVICES"] == ""


def test_exposed_port_serves_the_images_own_server(
        docker_client: Any, app_image: BuiltImage, tmp_path: Path) -> None:
    port = _free_port()
    command = ["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    backend = _backend(docker_client, tmp_path, app_image.tag, exposed_port=port,
                       command=command)

    async def call() -> tuple[str, int, list[str]]:
        events = RecordingEvents()
        handle = await backend.start(spec_for("exposed", kind="function"), events)
        async with httpx.AsyncClient() as http:
            status = (await http.get(f"{handle.url}/")).status_code
        await backend.stop(handle)
        return handle.url, status, events.state_names()

    url, status, states = asyncio.run(call())
    assert url == f"http://127.0.0.1:{port}" and status == 200
    assert states == ["SETUP", "IDLE", "DRAINING", "TERMINATED"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
