"""falcli.project: finding pyproject.toml, validating [tool.fal.apps], resolving refs.

Driven by the fixture projects on disk under tests/fixtures/projects (good ones at the top,
broken ones under broken/). Error messages are golden: exact strings.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from project_helpers import isolated_imports  # noqa: F401  (autouse: importing applies it)

import falcli.project
from falcli.errors import ConfigError, OptionError
from falcli.project import AppConfig, find_project, load_project, resolve_target

PROJECTS = Path(__file__).parent / "fixtures" / "projects"
BROKEN = PROJECTS / "broken"


def test_public_api_is_exactly_this() -> None:
    assert sorted(falcli.project.__all__) == [
        "AppConfig", "Project", "Target", "find_project", "load_project", "resolve_target",
    ]  # fmt: skip


def test_find_project_walks_up_from_a_subdirectory() -> None:
    project = find_project(PROJECTS / "multi" / "src" / "apps")
    assert project is not None
    assert project.root == (PROJECTS / "multi").resolve()
    assert sorted(project.apps) == ["alpha", "beta"]


def test_find_project_skips_a_pyproject_without_tool_fal(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.fal.apps.top]\nref = "a.py::A"\n')
    (tmp_path / "a.py").write_text("")
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "pyproject.toml").write_text('[project]\nname = "x"\n')
    project = find_project(inner)
    assert project is not None and project.root == tmp_path.resolve()


def test_no_project_anywhere_gives_none(tmp_path: Path) -> None:
    assert find_project(tmp_path) is None


def test_fields_are_validated_and_normalised() -> None:
    project = load_project(PROJECTS / "single" / "pyproject.toml")
    config = project.apps["greeter"]
    assert config == AppConfig(
        key="greeter",
        ref="greeter_app.py::Greeter",
        python_entry_point=None,
        fields={
            "auth": "private",
            "keep_alive": 300,
            "max_concurrency": 4,
            "machine_type": ["M"],
            "app_scale_settings": False,
        },
    )


def test_no_scale_is_accepted_with_a_deprecation_warning() -> None:
    project = load_project(PROJECTS / "single" / "pyproject.toml")
    assert project.warnings == [
        "[tool.fal.apps.greeter]: no_scale is deprecated: use app_scale_settings = false instead"
    ]


def test_requirement_layers_are_normalised() -> None:
    project = load_project(PROJECTS / "multi" / "pyproject.toml")
    assert project.apps["beta"].fields["requirements"] == [["pyjokes==0.6.0"], ["six"]]


def test_health_check_and_image_sub_tables(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM python:3.11\n")
    (tmp_path / "pyproject.toml").write_text(
        '[tool.fal.apps.x.health_check]\npath = "/health"\ntimeout_seconds = 2\n'
        '[tool.fal.apps.x.image]\ndockerfile = "Dockerfile"\ncmd = ["serve"]\n'
    )
    fields = load_project(tmp_path / "pyproject.toml").apps["x"].fields
    assert fields["health_check"] == {
        "path": "/health", "start_period_seconds": 30, "timeout_seconds": 2,
        "failure_threshold": 3, "call_regularly": False,
    }  # fmt: skip
    assert fields["image"]["dockerfile"] == "Dockerfile"
    assert fields["image"]["cmd"] == ["serve"]


GOLDEN = {
    "bad-class": "[tool.fal.apps.wrong]: wrong_app.py has no class or function 'Greeterr': "
    "did you mean 'Greeter'?",
    "bad-entry-point": "[tool.fal.apps.entry]: python_entry_point = 'my_package.server.Server' "
    'is invalid: expected <module>:<symbol>, e.g. python_entry_point = "my_package.server:MyApp"',
    "bad-ref-path": "[tool.fal.apps.lost]: ref = 'missing.py::Lost': file 'missing.py' does not "
    "exist in {root}: fix the path (it is relative to the directory of pyproject.toml)",
    "bad-regex": "[tool.fal.apps.regex]: app_files_ignore entry '(unclosed' is not a valid "
    "regular expression (missing ), unterminated subpattern at position 0): fix it, e.g. "
    r'app_files_ignore = ["\\.ckpt$", "^tmp/"]',
    "bad-types": "[tool.fal.apps.typed]: option keep_alive = 'ten' is invalid: expected an "
    "integer number of seconds >= 0, e.g. keep_alive = 300",
    "no-app": "[tool.fal.apps.empty]: empty_app.py defines no fal.App subclass or @fal.function: "
    "define one, or name the object, e.g. empty_app.py::MyApp",
    "ref-and-entry": "[tool.fal.apps.both]: ref = 'both_app.py::Both' and python_entry_point = "
    "'both_app:Both' are mutually exclusive: keep one of them",
    "two-apps": "[tool.fal.apps.pair]: pair_app.py defines several apps (First, Second): name "
    "one, e.g. pair_app.py::First",
    "typo": "[tool.fal.apps.typo]: unknown option 'keep_alvie' — did you mean 'keep_alive'?",
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_broken_projects_fail_with_exact_messages(name: str) -> None:
    root = (BROKEN / name).resolve()
    with pytest.raises(ConfigError) as info:
        resolve_target(None, root)
    assert str(info.value) == GOLDEN[name].format(root=root)


def test_bad_field_types_raise_option_errors() -> None:
    with pytest.raises(OptionError):
        load_project(BROKEN / "bad-types" / "pyproject.toml")


def test_an_app_whose_import_raises_shows_the_traceback_tail() -> None:
    root = (BROKEN / "import-raises").resolve()
    with pytest.raises(ConfigError) as info:
        resolve_target("crash", root)
    message = str(info.value)
    assert message.startswith(
        f"[tool.fal.apps.crash]: importing {root}/crash_app.py raised RuntimeError: model "
        "weights not found. Fix the error (traceback below) and retry:\nTraceback"
    )
    assert message.endswith(
        f'  File "{root}/crash_app.py", line 5, in load_weights\n'
        '    raise RuntimeError("model weights not found")\n'
        "RuntimeError: model weights not found"
    )
    assert "importlib" not in message and "falcli" not in message.split("\n", 1)[1]
    assert "crash_app" not in sys.modules  # a failed import leaves nothing behind


def test_an_option_refused_at_class_definition_is_one_clear_line(tmp_path: Path) -> None:
    source = 'import fal\n\nclass Opt(fal.App):\n    keep_alive = "ten"\n'
    (tmp_path / "opt_app.py").write_text(source)
    with pytest.raises(ConfigError) as info:
        resolve_target("opt_app.py::Opt", tmp_path)
    assert str(info.value) == (
        "ref 'opt_app.py::Opt': class Opt: option keep_alive = 'ten' is invalid: expected an "
        f"integer number of seconds >= 0, e.g. keep_alive = 300 ({tmp_path}/opt_app.py:3)"
    )


def test_a_syntax_error_is_reported_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "syntax_app.py").write_text("import fal\nclass Broken(fal.App)\n    pass\n")
    with pytest.raises(ConfigError, match=r"raised SyntaxError: expected ':'") as info:
        resolve_target("syntax_app.py", tmp_path)
    assert "line 2" in str(info.value)


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            'ref = "a.py::A"\nkeep_alive = true',
            "[tool.fal.apps.x]: option keep_alive = True is invalid: expected an integer "
            "number of seconds >= 0, e.g. keep_alive = 300",
        ),
        (
            'ref = "a.py::A"\nexposed_port = 70000',
            "[tool.fal.apps.x]: option exposed_port = 70000 is invalid: expected an integer "
            "port from 0 to 65535, e.g. exposed_port = 8080",
        ),
        (
            'ref = "a.py::A"\napp_files_context_dir = "."',
            "[tool.fal.apps.x]: app_files_context_dir = '.' is only valid together with "
            "app_files: add app_files or remove app_files_context_dir",
        ),
        (
            'ref = "a.py::A"\nname = "bad name"',
            "[tool.fal.apps.x]: name = 'bad name' is invalid: expected a name of letters, "
            "digits, '-' and '_' (at most 64), e.g. name = \"image-generator\"",
        ),
        (
            'auth = "private"',
            "[tool.fal.apps.x]: no ref or python_entry_point: add one, e.g. ref = "
            '"src/app.py::MyApp" or python_entry_point = "my_package.app:MyApp"',
        ),
        (
            'ref = "a.py::A"\n[tool.fal.apps.x.health_check]\ntimeout_seconds = 3',
            "[tool.fal.apps.x]: option health_check = {'timeout_seconds': 3} is invalid (path "
            "is required and must start with '/'): expected a table with a required 'path' and "
            "optional start_period_seconds, timeout_seconds, failure_threshold, call_regularly, "
            'e.g. health_check = {"path": "/health"}',
        ),
    ],
)
def test_field_errors_name_the_field_value_and_fix(
    tmp_path: Path, toml: str, expected: str
) -> None:
    (tmp_path / "a.py").write_text("")
    (tmp_path / "pyproject.toml").write_text(f"[tool.fal.apps.x]\n{toml}\n")
    with pytest.raises(ConfigError) as info:
        load_project(tmp_path / "pyproject.toml")
    assert str(info.value) == expected


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.fal.apps.x\n")
    with pytest.raises(ConfigError, match=r"pyproject.toml: invalid TOML: .*Fix the syntax"):
        find_project(tmp_path)


# -- refs ---------------------------------------------------------------------------------


def test_no_ref_picks_the_single_app() -> None:
    target = resolve_target(None, PROJECTS / "single")
    assert target.app_key == "greeter"
    assert target.obj.__name__ == "Greeter"
    assert target.config is not None and target.config.fields["keep_alive"] == 300


def test_no_ref_with_several_apps_lists_them() -> None:
    root = (PROJECTS / "multi").resolve()
    with pytest.raises(ConfigError) as info:
        resolve_target(None, root)
    assert str(info.value) == (
        f"{root}/pyproject.toml defines several apps (alpha, beta): name one, e.g. `fal run alpha`"
    )


def test_no_ref_and_no_project(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no app given and no pyproject.toml"):
        resolve_target(None, tmp_path)


def test_app_key_with_a_file_ref_naming_no_class_finds_the_single_app() -> None:
    target = resolve_target("beta", PROJECTS / "multi")
    assert target.obj.__name__ == "Beta" and target.obj.__module__ == "src.apps.beta"


def test_file_ref_from_the_command_line_picks_up_its_pyproject_entry() -> None:
    target = resolve_target("src/apps/alpha.py::Alpha", PROJECTS / "multi")
    assert target.app_key == "alpha"
    assert target.config is not None and target.config.fields["name"] == "alpha-toml"


def test_file_ref_relative_to_cwd_without_a_project(tmp_path: Path) -> None:
    (tmp_path / "solo_app.py").write_text(
        "import fal\n\nclass Solo(fal.App):\n    keep_alive = 5\n"
    )
    target = resolve_target("solo_app.py::Solo", tmp_path)
    assert target.project is None and target.config is None
    assert target.root == tmp_path.resolve()
    assert target.obj.__fal_options__ == {"keep_alive": 5}


def test_module_symbol_ref(tmp_path: Path) -> None:
    package = tmp_path / "src" / "symbol_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "server.py").write_text("import fal\n\nclass Served(fal.App):\n    pass\n")
    target = resolve_target("symbol_pkg.server:Served", tmp_path)
    assert target.obj.__name__ == "Served"


def test_unknown_app_key_suggests_the_closest() -> None:
    root = (PROJECTS / "multi").resolve()
    with pytest.raises(ConfigError) as info:
        resolve_target("alhpa", root)
    assert str(info.value) == (
        f"ref 'alhpa' is not an app of [tool.fal.apps] in {root}/pyproject.toml: "
        "did you mean 'alpha'?"
    )


def test_a_ref_naming_a_non_app_object(tmp_path: Path) -> None:
    shutil.copy(PROJECTS / "single" / "greeter_app.py", tmp_path / "greeter_copy.py")
    with pytest.raises(ConfigError) as info:
        resolve_target("greeter_copy.py::Input", tmp_path)
    assert str(info.value) == (
        "ref 'greeter_copy.py::Input': 'Input' in greeter_copy.py is a ModelMetaclass, not a "
        "fal.App subclass or @fal.function: apps defined there: Greeter"
    )
