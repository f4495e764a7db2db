"""falcli.endpoints: specs, the OpenAPI document, and the runner's ASGI app driven for real."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import BaseModel, Field
from starlette.responses import StreamingResponse
from starlette.websockets import WebSocket

import fal
from falcli import __version__
from falcli.app import instantiate
from falcli.endpoints import EndpointSpec, asgi_app_for, endpoint_specs, openapi_for

with warnings.catch_warnings():
    # Starlette 1.x asks for the httpx2 fork; the installed httpx works the same here.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


class Prompt(BaseModel):
    prompt: str
    steps: int = Field(default=30, ge=1)


class Image(BaseModel):
    url: str
    steps: int


class Demo(fal.App):
    machine_type = "GPU-H100"

    def setup(self) -> None:
        raise AssertionError("setup() must not run to derive specs or OpenAPI")

    @fal.endpoint("/")
    def generate(self, data: Prompt) -> Image:
        return Image(url=f"https://x/{data.prompt}", steps=data.steps)

    @fal.endpoint("/add")
    async def add(self, a: int, b: int = 10) -> dict[str, int]:
        return {"sum": a + b}

    @fal.endpoint("/ping")
    def ping(self) -> str:
        return "pong"

    @fal.endpoint("/boom")
    def boom(self) -> None:
        raise ZeroDivisionError("division by zero in boom")

    @fal.endpoint("/stream")
    def stream(self) -> StreamingResponse:
        release: threading.Event = self.release  # type: ignore[attr-defined]

        def events() -> Iterator[str]:
            yield 'data: {"n": 1}\n\n'
            released = release.wait(5)
            yield f"data: {json.dumps({'n': 2, 'released': released})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @fal.endpoint("/ws", is_websocket=True)
    async def echo(self, websocket: WebSocket) -> None:
        await websocket.accept()
        while (text := await websocket.receive_text()) != "bye":
            await websocket.send_text(f"echo: {text}")
        await websocket.close()


def _demo_instance() -> Demo:
    app = instantiate(Demo)
    app.release = threading.Event()  # type: ignore[attr-defined]
    return app


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(asgi_app_for(_demo_instance())) as test_client:
        yield test_client


# -- specs and OpenAPI ------------------------------------------------------------------------


def test_endpoint_specs() -> None:
    specs = {spec.attr: spec for spec in endpoint_specs(Demo)}
    assert list(specs) == ["generate", "add", "ping", "boom", "stream", "echo"]
    assert specs["generate"] == EndpointSpec("/", "generate", False, Prompt, Image, "data")
    add = specs["add"]
    assert add.body_param is None and add.body_model is not None
    assert add.body_model.__name__ == "AddInput"
    assert add.body_model(a=1).model_dump() == {"a": 1, "b": 10}
    assert specs["ping"].body_model is None
    assert specs["stream"].response_model is None
    assert specs["echo"].is_websocket and specs["echo"].body_model is None


def test_openapi_document_without_running_setup() -> None:
    doc = openapi_for(Demo)
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] == "demo"
    assert set(doc["paths"]) == {"/", "/add", "/ping", "/boom", "/stream"}
    root = doc["paths"]["/"]["post"]
    body_schema = root["requestBody"]["content"]["application/json"]["schema"]
    assert body_schema == {"$ref": "#/components/schemas/Prompt"}
    response_schema = root["responses"]["200"]["content"]["application/json"]["schema"]
    assert response_schema == {"$ref": "#/components/schemas/Image"}
    schemas = doc["components"]["schemas"]
    assert schemas["Prompt"]["required"] == ["prompt"]
    assert schemas["Prompt"]["properties"]["steps"]["minimum"] == 1
    assert schemas["AddInput"]["properties"]["b"]["default"] == 10
    assert "requestBody" not in doc["paths"]["/ping"]["post"]
    json.dumps(doc)  # must be JSON-able: it goes into the manifest


# -- the ASGI app -----------------------------------------------------------------------------


def test_model_body_and_model_response(client: TestClient) -> None:
    response = client.post("/", json={"prompt": "cat"})
    assert response.status_code == 200
    assert response.json() == {"url": "https://x/cat", "steps": 30}


def test_fields_body_async_endpoint_and_plain_value(client: TestClient) -> None:
    assert client.post("/add", json={"a": 1, "b": 2}).json() == {"sum": 3}
    assert client.post("/add", json={"a": 5}).json() == {"sum": 15}
    assert client.post("/ping").json() == "pong"


def test_health_and_openapi_routes(client: TestClient) -> None:
    assert client.get("/health").json() == {"version": __version__}
    assert client.get("/openapi.json").json() == openapi_for(Demo)


def test_unknown_path_is_a_json_404(client: TestClient) -> None:
    response = client.post("/nope", json={})
    assert response.status_code == 404
    assert response.json() == {"detail": "Path /nope not found"}


def test_invalid_body_is_a_pydantic_style_422(client: TestClient) -> None:
    response = client.post("/", json={"steps": 0})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert {tuple(e["loc"]) for e in detail} == {("body", "prompt"), ("body", "steps")}
    assert {e["type"] for e in detail} == {"missing", "greater_than_equal"}
    assert all(isinstance(e["msg"], str) and e["msg"] for e in detail)


def test_malformed_json_is_a_422(client: TestClient) -> None:
    response = client.post(
        "/add", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body"] and error["type"] == "json_invalid"


def test_endpoint_exception_is_a_500_with_the_traceback_logged(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="falcli.endpoints"):
        response = client.post("/boom")
    assert response.status_code == 500
    assert response.json() == {"detail": "ZeroDivisionError: division by zero in boom"}
    [record] = caplog.records
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError
    assert "/boom" in record.getMessage()


def test_websocket_echo(client: TestClient) -> None:
    with client.websocket_connect("/ws") as ws:
        ws.send_text("hi")
        assert ws.receive_text() == "echo: hi"
        ws.send_text("again")
        assert ws.receive_text() == "echo: again"
        ws.send_text("bye")


def test_function_is_served_as_post_root() -> None:
    @fal.function(keep_alive=5)
    def multiply(a: int, b: int = 2) -> dict[str, Any]:
        return {"product": a * b}

    assert openapi_for(multiply)["paths"]["/"]["post"]["operationId"] == "multiply"
    with TestClient(asgi_app_for(multiply)) as client:
        assert client.post("/", json={"a": 3}).json() == {"product": 6}
        assert client.post("/", json={"a": "x"}).status_code == 422


def test_function_with_openapi_metadata_reports_it() -> None:
    spec = {"openapi": "3.1.0", "info": {"title": "srv", "version": "1"}, "paths": {}}

    @fal.function(exposed_port=8000, metadata={"openapi": spec})
    def server() -> None: ...

    assert openapi_for(server) == spec


# -- streaming over a real server -------------------------------------------------------------


@pytest.fixture
def live() -> Iterator[tuple[str, Demo]]:
    """The demo app served by a real uvicorn on 127.0.0.1 (port chosen by the OS)."""
    app = _demo_instance()
    config = uvicorn.Config(
        asgi_app_for(app), host="127.0.0.1", port=0, ws="none", lifespan="off",
        log_level="warning",
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
        assert thread.is_alive(), "uvicorn exited during startup"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(10)


@pytest.mark.slow
def test_sse_events_arrive_incrementally(live: tuple[str, Demo]) -> None:
    # The second event is only produced once the test has seen the first one, so a
    # buffering server would stall until release.wait times out and report released=False.
    url, app = live
    with httpx.Client(base_url=url, timeout=10) as http:
        with http.stream("POST", "/stream") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = (line for line in response.iter_lines() if line.startswith("data:"))
            assert json.loads(next(events)[5:]) == {"n": 1}
            assert http.post("/ping").json() == "pong"  # still serving while a stream is open
            app.release.set()  # type: ignore[attr-defined]
            assert json.loads(next(events)[5:]) == {"n": 2, "released": True}


# -- a cloudpickled app served in a fresh process (what a runner does) -------------------------

_USER_APP = """
from __future__ import annotations
import sys, cloudpickle, fal
from pydantic import BaseModel

class In(BaseModel):
    prompt: str

class Out(BaseModel):
    text: str

class MyGoodApp(fal.App, keep_alive=30):
    def setup(self) -> None:
        self.prefix = "hi "

    @fal.endpoint("/")
    def run(self, data: In) -> Out:
        return Out(text=self.prefix + data.prompt)

sys.stdout.buffer.write(cloudpickle.dumps(MyGoodApp))
"""

_RUNNER = """
import asyncio, json, pickle, sys, warnings
from falcli.app import call_hook, instantiate
from falcli.endpoints import asgi_app_for
cls = pickle.load(open(sys.argv[1], "rb"))
app = instantiate(cls)
asyncio.run(call_hook(app, "setup"))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient
reply = TestClient(asgi_app_for(app)).post("/", json={"prompt": "x"}).json()
print(json.dumps({"options": cls.__fal_options__, "reply": reply}))
"""


@pytest.mark.slow
def test_pickled_app_with_string_annotations_serves_in_a_fresh_process(tmp_path: Path) -> None:
    # The user file uses `from __future__ import annotations`; its models are defined in
    # __main__, so they only reach the runner if the pickled class carries them.
    (tmp_path / "user_app.py").write_text(_USER_APP)
    payload = subprocess.run(
        [sys.executable, "user_app.py"], cwd=tmp_path, capture_output=True, check=True
    ).stdout
    (tmp_path / "payload.pkl").write_bytes(payload)
    (tmp_path / "user_app.py").unlink()  # the runner must not need the source
    out = subprocess.run(
        [sys.executable, "-c", _RUNNER, "payload.pkl"], cwd=tmp_path, capture_output=True,
        text=True, check=True,
    ).stdout  # fmt: skip
    assert json.loads(out) == {"options": {"keep_alive": 30}, "reply": {"text": "hi x"}}


class ImageGenerationApp(fal.App):
    """The "complete example" of fal's App class reference, minus the model."""

    requirements = ["torch==2.1.0", "transformers==4.35.0", "accelerate"]
    local_python_modules = ["custom_pipeline"]
    machine_type = ["GPU-H100", "GPU-H200"]
    num_gpus = 1
    request_timeout = 600
    startup_timeout = 900
    app_auth = "shared"
    app_name = "stable-diffusion-xl"
    keep_alive = 300
    min_concurrency = 1
    max_concurrency = 10
    concurrency_buffer = 1
    max_multiplexing = 1

    @fal.endpoint("/generate")
    def generate(self, prompt: str, steps: int = 30) -> dict[str, Any]:
        return {"image": prompt, "steps": steps}

    @fal.endpoint("/health")
    def health_check(self) -> dict[str, str]:  # shares its name with the health_check option
        return {"status": "healthy"}


def test_reference_example_defines_and_serves() -> None:
    options = ImageGenerationApp.__fal_options__
    assert options["machine_type"] == ["GPU-H100", "GPU-H200"]
    assert (options["auth"], options["app_name"]) == ("shared", "stable-diffusion-xl")
    assert "health_check" not in options
    with TestClient(asgi_app_for(instantiate(ImageGenerationApp))) as client:
        assert client.post("/health").json() == {"status": "healthy"}
        assert client.get("/health").json() == {"version": __version__}
        assert client.post("/generate", json={"prompt": "a"}).json() == {"image": "a", "steps": 30}
