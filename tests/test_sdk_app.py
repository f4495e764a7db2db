"""fal.App at class definition, instantiation and lifecycle; @fal.function; ContainerImage."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

import fal
from falcli.app import call_hook, instantiate
from falcli.errors import AppInstantiationError, ConfigError, OptionError
from falcli.naming import app_name_of, kebab_case

# -- options on the class -----------------------------------------------------------------


def test_class_attributes_are_validated_and_recorded() -> None:
    class Gen(fal.App):
        machine_type = "GPU-H100"
        keep_alive = 300
        app_auth = "shared"
        requirements = ["numpy"]

    assert Gen.__fal_options__ == {
        "machine_type": ["GPU-H100"],
        "keep_alive": 300,
        "auth": "shared",
        "requirements": [["numpy"]],
    }


def test_only_explicit_options_are_recorded() -> None:
    class Plain(fal.App):
        pass

    assert Plain.__fal_options__ == {}


def test_class_keywords_and_host_kwargs() -> None:
    class Kw(fal.App, keep_alive=300, host_kwargs={"max_multiplexing": 4, "keep_alive": 1}):
        pass

    assert Kw.__fal_options__ == {"keep_alive": 300, "max_multiplexing": 4}


def test_unknown_class_keyword_is_refused() -> None:
    with pytest.raises(OptionError, match=r"keywords: unknown option 'keepalive' — did you mean"):

        class Bad(fal.App, keepalive=3):
            pass


def test_option_set_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="both as a class attribute and as a class keyword"):

        class Twice(fal.App, keep_alive=3):
            keep_alive = 4


def test_ill_typed_attribute_fails_at_class_definition() -> None:
    with pytest.raises(OptionError) as info:

        class Bad(fal.App):
            keep_alive = "ten"

    assert str(info.value) == (
        "class test_ill_typed_attribute_fails_at_class_definition.<locals>.Bad: option "
        "keep_alive = 'ten' is invalid: expected an integer number of seconds >= 0, "
        "e.g. keep_alive = 300"
    )


def test_misspelt_attribute_gets_a_did_you_mean() -> None:
    with pytest.raises(
        OptionError, match="unknown option 'keep_alvie' — did you mean 'keep_alive'"
    ):

        class Bad(fal.App):
            keep_alvie = 300


def test_unrelated_attributes_and_methods_are_not_options() -> None:
    class Fine(fal.App):
        model_id = "stabilityai/sdxl"
        _cache: dict[str, int] = {}

        def keep_alives(self) -> int:  # close to an option name, but a method
            return 1

    assert Fine.__fal_options__ == {}


def test_options_are_inherited_from_user_bases_and_mixins() -> None:
    class Scaling:
        max_concurrency = 3

    class Base(fal.App):
        keep_alive = 100
        machine_type = "M"

    class Child(Scaling, Base):
        machine_type = "L"

    assert Child.__fal_options__ == {"keep_alive": 100, "machine_type": ["L"], "max_concurrency": 3}
    assert Base.__fal_options__ == {"keep_alive": 100, "machine_type": ["M"]}


# -- instantiation ----------------------------------------------------------------------------


class Counter(fal.App):
    calls: list[str] = []

    def setup(self) -> None:
        self.calls.append(f"setup in {threading.current_thread().name}")

    async def teardown(self) -> None:
        self.calls.append("teardown")


def test_instantiation_outside_a_runner_is_refused() -> None:
    with pytest.raises(AppInstantiationError, match=r"Counter\(\) cannot be created here.*fal run"):
        Counter()


def test_overriding_init_is_refused() -> None:
    with pytest.raises(AppInstantiationError, match=r"overriding __init__ .* `def setup\(self\)`"):

        class WithInit(fal.App):
            def __init__(self) -> None:
                pass


def test_instantiate_and_hooks_sync_in_a_thread_async_on_the_loop() -> None:
    app = instantiate(Counter)
    assert isinstance(app, Counter)
    Counter.calls.clear()
    asyncio.run(call_hook(app, "setup"))
    asyncio.run(call_hook(app, "teardown"))
    asyncio.run(call_hook(app, "handle_exit"))  # the base class no-op
    assert len(Counter.calls) == 2
    assert "MainThread" not in Counter.calls[0]
    assert Counter.calls[1] == "teardown"
    with pytest.raises(ValueError, match="unknown lifecycle hook 'start'"):
        asyncio.run(call_hook(app, "start"))
    with pytest.raises(TypeError):
        instantiate(int)  # type: ignore[type-var]


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kebab"),
    [
        ("MyGoodApp", "my-good-app"),
        ("HTTPServer", "http-server"),
        ("my_func", "my-func"),
        ("SDXLApp2", "sdxl-app2"),
        ("App", "app"),
    ],
)
def test_kebab_names(name: str, kebab: str) -> None:
    assert kebab_case(name) == kebab


def test_app_name_override() -> None:
    class MyGoodApp(fal.App):
        pass

    class Named(fal.App):
        app_name = "image-gen"

    assert (app_name_of(MyGoodApp), app_name_of(Named)) == ("my-good-app", "image-gen")


# -- endpoint declaration errors --------------------------------------------------------------


def test_endpoint_path_must_start_with_slash() -> None:
    with pytest.raises(ConfigError, match="must be a string starting with '/'"):
        fal.endpoint("predict")


def test_duplicate_endpoint_paths_are_refused() -> None:
    with pytest.raises(ConfigError, match="both use path '/'"):

        class Dup(fal.App):
            @fal.endpoint("/")
            def a(self) -> None: ...

            @fal.endpoint("/")
            def b(self) -> None: ...


def test_var_args_endpoint_and_sync_websocket_are_refused() -> None:
    with pytest.raises(ConfigError, match="parameter 'args' is variadic positional"):

        class Star(fal.App):
            @fal.endpoint("/")
            def a(self, *args: int) -> None: ...

    with pytest.raises(ConfigError, match="must be `async def ws"):

        class SyncWs(fal.App):
            @fal.endpoint("/ws", is_websocket=True)
            def ws(self, websocket: object) -> None: ...


# -- @fal.function and ContainerImage ---------------------------------------------------------


def test_function_records_explicit_options_and_still_runs_locally() -> None:
    @fal.function(machine_type="GPU-A100", keep_alive=60, serve=True)
    def add(a: int, b: int = 1) -> int:
        return a + b

    assert isinstance(add, fal.FalFunction)
    assert add.__fal_options__ == {"machine_type": ["GPU-A100"], "keep_alive": 60}
    assert (add.serve, add(2), app_name_of(add)) == (True, 3, "add")


def test_bare_function_decorator() -> None:
    @fal.function
    def hello_world() -> str:
        return "hi"

    assert (hello_world.__fal_options__, app_name_of(hello_world)) == ({}, "hello-world")


def test_function_errors() -> None:
    with pytest.raises(OptionError, match=r"@fal.function on '.*\bf': unknown option 'kep_alive'"):

        @fal.function(kep_alive=3)
        def f() -> None: ...

    with pytest.raises(OptionError, match=r"exposed_port = 8080 needs an OpenAPI document"):

        @fal.function(exposed_port=8080)
        def server() -> None: ...

    with pytest.raises(OptionError, match="image is required"):
        fal.function("container")
    with pytest.raises(OptionError, match="kind = 'docker' is invalid"):
        fal.function("docker")


def test_function_with_exposed_port_and_openapi_metadata() -> None:
    image = fal.ContainerImage.from_dockerfile_str("FROM python:3.11", cmd=["python", "-m", "s"])
    openapi = {"openapi": "3.1.0", "paths": {}}

    @fal.function("container", image=image, exposed_port=8080, metadata={"openapi": openapi})
    def server() -> None: ...

    assert server.kind == "container"
    assert server.__fal_options__["exposed_port"] == 8080
    assert server.__fal_options__["image"]["cmd"] == ["python", "-m", "s"]  # type: ignore[index]


def test_container_image_from_file_and_round_trip(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM python:3.11-slim\nRUN pip install uv\n")
    image = fal.ContainerImage.from_dockerfile(
        dockerfile,
        build_args={"V": "1"},
        registries={"r.io": {"username": "me", "password": "pw"}},
        entrypoint="python",
    )
    assert image.dockerfile_str == dockerfile.read_text()
    assert fal.ContainerImage.from_dict(image.to_dict()) == image


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"build_args": {"A": 1}}, "build_args .* expected a dict of strings"),
        ({"registries": {"r.io": {"username": "me"}}}, "needs string 'username' and 'password'"),
        ({"entrypoint": ["python", 3]}, "entrypoint = .* expected a string or a list"),
        ({"cmd": 5}, "cmd = 5 is invalid"),
    ],
)
def test_container_image_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(OptionError, match=match):
        fal.ContainerImage.from_dockerfile_str("FROM x", **kwargs)  # type: ignore[arg-type]


def test_container_image_needs_exactly_one_dockerfile(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="exactly one of dockerfile_str"):
        fal.ContainerImage()
    with pytest.raises(OptionError, match="cannot read .*missing"):
        fal.ContainerImage.from_dockerfile(tmp_path / "missing")
    with pytest.raises(OptionError, match="unknown option 'dockerfle'"):
        fal.ContainerImage.from_dict({"dockerfle": "Dockerfile"})
