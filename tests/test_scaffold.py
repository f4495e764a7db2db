"""falcli.scaffold: starter apps from templates/, registered in pyproject.toml via tomlkit.

Each template is written, resolved and packaged for real; its endpoints are called on an
instance made the way a runner makes one (instantiate + setup).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from project_helpers import isolated_imports  # noqa: F401  (autouse: importing applies it)

import falcli.scaffold
from falcli.app import call_hook, instantiate
from falcli.errors import ConfigError
from falcli.packaging import package
from falcli.project import load_project, resolve_target
from falcli.scaffold import create_app, list_templates


def _runner_instance(cls: type) -> object:
    instance = instantiate(cls)
    asyncio.run(call_hook(instance, "setup"))
    return instance


def test_public_api_is_exactly_this() -> None:
    assert sorted(falcli.scaffold.__all__) == [
        "CreatedApp", "TEMPLATES_DIR", "create_app", "list_templates",
    ]  # fmt: skip


def test_templates_are_listed_with_a_description() -> None:
    assert list_templates() == {
        "basic": "a small CPU app with a pydantic Input/Output and setup().",
        "proxy": "proxy app mode, a typed API in front of a server that setup() starts.",
        "streaming": "an app that streams server-sent events (SSE) from /stream.",
    }


def test_basic_app_in_an_empty_directory(tmp_path: Path) -> None:
    created = create_app(tmp_path, "hello-world")
    assert created.ref == "src/hello_world/app.py::HelloWorld"
    assert created.files == [tmp_path / "src/hello_world/app.py", tmp_path / "pyproject.toml"]
    assert (tmp_path / "pyproject.toml").read_text() == (
        '[tool.fal.apps.hello-world]\nref = "src/hello_world/app.py::HelloWorld"\n'
    )
    target = resolve_target(None, tmp_path)
    bundle = package(target, cache_dir=tmp_path / "cache")
    manifest = bundle.manifest
    assert manifest["app_name"] == "hello-world"
    assert manifest["requirements"] == [] and manifest["files"] == {}
    assert list(manifest["openapi"]["paths"]) == ["/"]
    app = _runner_instance(target.obj)  # type: ignore[arg-type]
    model = target.obj.greet.__annotations__["input"]  # type: ignore[union-attr]
    assert app.greet(model(name="fal")).greeting == "Hello, fal!"  # type: ignore[attr-defined]


def test_streaming_app_streams_server_sent_events(tmp_path: Path) -> None:
    create_app(tmp_path, "streamer", "streaming")
    target = resolve_target("streamer", tmp_path)
    manifest = package(target, cache_dir=tmp_path / "cache").manifest
    assert sorted(manifest["openapi"]["paths"]) == ["/", "/stream"]
    app = _runner_instance(target.obj)  # type: ignore[arg-type]
    events = list(app._events("a b"))  # type: ignore[attr-defined]
    assert events == [
        'data: {"index": 0, "word": "a"}\n\n',
        'data: {"index": 1, "word": "b"}\n\n',
        'data: {"done": true, "words": 2}\n\n',
    ]


def test_existing_pyproject_keeps_its_comments_and_formatting(tmp_path: Path) -> None:
    original = (
        '# top comment\n[project]\nname   =   "demo"  # aligned on purpose\n\n'
        '[tool.fal.apps]\nother = { ref = "other.py::Other", keep_alive = 5 }  # inline\n'
    )
    (tmp_path / "pyproject.toml").write_text(original)
    (tmp_path / "other.py").write_text("")
    create_app(tmp_path, "second-app")
    text = (tmp_path / "pyproject.toml").read_text()
    assert text.startswith(original)
    assert text[len(original) :] == (
        '\n[tool.fal.apps.second-app]\nref = "src/second_app/app.py::SecondApp"\n'
    )
    assert sorted(load_project(tmp_path / "pyproject.toml").apps) == ["other", "second-app"]


def test_pyproject_without_tool_fal_gets_the_table(tmp_path: Path) -> None:
    original = '[project]\nname = "demo"\n\n[tool.ruff]\nline-length = 100\n'
    (tmp_path / "pyproject.toml").write_text(original)
    create_app(tmp_path, "demo-app")
    text = (tmp_path / "pyproject.toml").read_text()
    assert text.startswith(original)
    assert load_project(tmp_path / "pyproject.toml").apps["demo-app"].ref == (
        "src/demo_app/app.py::DemoApp"
    )


def test_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    create_app(tmp_path, "twice")
    app_file = tmp_path / "src/twice/app.py"
    app_file.write_text("# edited by the user\n")
    with pytest.raises(ConfigError) as info:
        create_app(tmp_path, "twice")
    assert str(info.value) == (
        f"{tmp_path}/pyproject.toml: [tool.fal.apps.twice] already exists: pass --force to "
        "replace it, or choose another app name"
    )
    assert app_file.read_text() == "# edited by the user\n"
    create_app(tmp_path, "twice", force=True)
    assert "class Twice(fal.App)" in app_file.read_text()
    assert load_project(tmp_path / "pyproject.toml").apps["twice"].ref is not None


def test_refuses_an_existing_file_not_in_pyproject(tmp_path: Path) -> None:
    (tmp_path / "src/taken").mkdir(parents=True)
    (tmp_path / "src/taken/app.py").write_text("keep me\n")
    with pytest.raises(ConfigError, match=r"app.py already exists: pass --force"):
        create_app(tmp_path, "taken")
    assert not (tmp_path / "pyproject.toml").exists()  # nothing written on refusal


@pytest.mark.parametrize("name", ["Bad_Name", "1app", "my--app", ""])
def test_bad_app_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError) as info:
        create_app(tmp_path, name)
    assert str(info.value) == (
        f"app name {name!r} is invalid: use lowercase letters, digits and single '-' between "
        "words, starting with a letter (at most 64), e.g. image-generator"
    )


def test_unknown_template(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        create_app(tmp_path, "x-app", "gpu")
    assert str(info.value) == (
        "template 'gpu' does not exist: choose one of basic, proxy, streaming, "
        "e.g. --template basic"
    )
