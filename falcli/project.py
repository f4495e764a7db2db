"""Project config: find pyproject.toml, validate ``[tool.fal.apps]``, resolve app refs.

A ref names the app to run or deploy, in one of four forms:

- ``path/to/file.py::ClassName``: a class (or ``@fal.function``) in a file;
- ``path/to/file.py``: the single ``fal.App`` / ``FalFunction`` defined in that file;
- ``app-key``: an entry of ``[tool.fal.apps]``;
- ``package.module:Symbol``: an importable object (``python_entry_point`` form).

File refs inside pyproject.toml are relative to its directory. File refs given on the command
line are relative to the working directory, falling back to the project root. Runtime option
fields are validated by ``falcli.options``; the project-only fields (ref, name, team,
app_files, ...) here. Precedence is documented in docs/configuration.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomlkit
from tomlkit.exceptions import TOMLKitError

from falcli.errors import ConfigError
from falcli.options import check_known, suggest, validate_option

if TYPE_CHECKING:
    from falcli.function import FalFunction

__all__ = ["AppConfig", "Project", "Target", "find_project", "load_project", "resolve_target"]

RUNTIME_FIELDS = (
    "auth", "deployment_strategy", "app_scale_settings", "requirements", "python_version",
    "machine_type", "num_gpus", "regions", "min_concurrency", "max_concurrency",
    "max_multiplexing", "concurrency_buffer", "concurrency_buffer_perc", "scaling_delay",
    "keep_alive", "request_timeout", "startup_timeout", "private_logs", "exposed_port",
    "skip_retry_conditions", "termination_grace_period_seconds", "secrets", "data_mounts",
    "health_check", "image",
)  # fmt: skip
PROJECT_FIELDS = (
    "ref", "python_entry_point", "name", "team", "app_files", "app_files_ignore",
    "app_files_context_dir", "no_scale",
)  # fmt: skip
_ENTRY_POINT = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass
class AppConfig:
    """One ``[tool.fal.apps.<key>]`` entry; ``fields`` holds everything else, validated."""

    key: str
    ref: str | None
    python_entry_point: str | None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class Project:
    root: Path
    pyproject: Path
    apps: dict[str, AppConfig]
    warnings: list[str] = field(default_factory=list)


@dataclass
class Target:
    """What ``fal run`` / ``fal deploy`` acts on: the object, and the config it came with."""

    project: Project | None
    app_key: str | None
    obj: type | FalFunction
    config: AppConfig | None
    root: Path


# -- finding and loading ------------------------------------------------------------------


def find_project(start: Path) -> Project | None:
    """The project of the first pyproject.toml with ``[tool.fal]`` at or above ``start``."""
    here = start.resolve()
    for directory in (here, *here.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file() and "fal" in _read_toml(candidate).get("tool", {}):
            return load_project(candidate)
    return None


def load_project(pyproject: Path) -> Project:
    """Parse and validate ``[tool.fal.apps]`` of ``pyproject``; raise ConfigError."""
    pyproject = pyproject.resolve()
    fal = _read_toml(pyproject).get("tool", {}).get("fal", {})
    apps_table = fal.get("apps", {}) if isinstance(fal, Mapping) else None
    if not isinstance(apps_table, Mapping):
        raise ConfigError(
            f"{pyproject}: [tool.fal.apps] must be a table of apps, e.g. "
            '[tool.fal.apps]\nmy-app = { ref = "app.py::MyApp" }'
        )
    project = Project(root=pyproject.parent, pyproject=pyproject, apps={})
    for key, table in apps_table.items():
        project.apps[key] = _load_app(key, table, project)
    return project


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomlkit.parse(path.read_text(encoding="utf-8")).unwrap()
    except TOMLKitError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}. Fix the syntax and retry") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it: {exc}") from None


# -- validation -----------------------------------------------------------------------------


def _load_app(key: str, table: object, project: Project) -> AppConfig:
    where = f"[tool.fal.apps.{key}]"
    if not isinstance(table, Mapping):
        raise ConfigError(
            f"{where}: expected a table of app fields, got {table!r}, e.g. "
            f'{key} = {{ ref = "app.py::MyApp" }}'
        )
    check_known(table, where=where, known=[*PROJECT_FIELDS, *RUNTIME_FIELDS])
    ref, entry = _entry(table, where, project.root)
    fields: dict[str, Any] = {}
    for name, value in table.items():
        if name in RUNTIME_FIELDS:
            fields[name] = validate_option(name, value, where=where)
        elif name not in ("ref", "python_entry_point"):
            fields[name] = _check_project_field(name, value, where, project.root)
    _check_combinations(fields, table, where, project)
    return AppConfig(key=key, ref=ref, python_entry_point=entry, fields=fields)


def _entry(table: Mapping[str, Any], where: str, root: Path) -> tuple[str | None, str | None]:
    ref, entry = table.get("ref"), table.get("python_entry_point")
    if ref is not None and entry is not None:
        raise ConfigError(
            f"{where}: ref = {ref!r} and python_entry_point = {entry!r} are mutually "
            "exclusive: keep one of them"
        )
    if entry is not None and (not isinstance(entry, str) or not _ENTRY_POINT.fullmatch(entry)):
        raise ConfigError(
            f"{where}: python_entry_point = {entry!r} is invalid: expected <module>:<symbol>, "
            'e.g. python_entry_point = "my_package.server:MyApp"'
        )
    if ref is not None:
        _check_ref_file(ref, where, root)
    elif entry is None and "image" not in table:
        raise ConfigError(
            f"{where}: no ref or python_entry_point: add one, e.g. "
            'ref = "src/app.py::MyApp" or python_entry_point = "my_package.app:MyApp"'
        )
    return ref, entry


def _check_ref_file(ref: object, where: str, root: Path) -> None:
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(
            f'{where}: ref = {ref!r} is invalid: expected "path/to/file.py::ClassName", '
            'e.g. ref = "src/app.py::MyApp"'
        )
    path = ref.split("::", 1)[0]
    if not (root / path).is_file():
        raise ConfigError(
            f"{where}: ref = {ref!r}: file {path!r} does not exist in {root}: fix the path "
            "(it is relative to the directory of pyproject.toml)"
        )


def _check_project_field(name: str, value: object, where: str, root: Path) -> object:
    if name == "name":
        if not isinstance(value, str) or not _APP_NAME.fullmatch(value):
            raise _bad(where, name, value, "a name of letters, digits, '-' and '_' "
                       "(at most 64)", '"image-generator"')  # fmt: skip
        return value
    if name == "team":
        if not isinstance(value, str) or not value.strip():
            raise _bad(where, name, value, "a team slug", '"my-team"')
        return value
    if name == "no_scale":
        if not isinstance(value, bool):
            raise _bad(where, name, value, "true or false", "false")
        return value
    if name == "app_files_context_dir":
        if not isinstance(value, str) or not (root / value).is_dir():
            raise _bad(where, name, value, f"a directory (relative to {root})", '"src"')
        return value
    return _check_file_list(name, value, where)


def _check_file_list(name: str, value: object, where: str) -> list[str]:
    example = '["assets", "config.json"]' if name == "app_files" else r'["\\.ckpt$", "^tmp/"]'
    if isinstance(value, str) or not isinstance(value, list):
        raise _bad(where, name, value, "a list of strings", example)
    for item in value:
        if not isinstance(item, str) or not item:
            raise _bad(where, name, value, "a list of non-empty strings", example)
        if name == "app_files_ignore":
            try:
                re.compile(item)
            except re.error as exc:
                raise ConfigError(
                    f"{where}: app_files_ignore entry {item!r} is not a valid regular "
                    f"expression ({exc}): fix it, e.g. app_files_ignore = {example}"
                ) from None
    return list(value)


def _bad(where: str, name: str, value: object, expected: str, example: str) -> ConfigError:
    return ConfigError(
        f"{where}: {name} = {value!r} is invalid: expected {expected}, e.g. {name} = {example}"
    )


def _check_combinations(
    fields: dict[str, Any], table: Mapping[str, Any], where: str, project: Project
) -> None:
    if "app_files_context_dir" in fields and "app_files" not in fields:
        raise ConfigError(
            f"{where}: app_files_context_dir = {fields['app_files_context_dir']!r} is only "
            "valid together with app_files: add app_files or remove app_files_context_dir"
        )
    image = fields.get("image")
    if image and image.get("dockerfile") and not (project.root / image["dockerfile"]).is_file():
        raise ConfigError(
            f"{where}: image.dockerfile = {image['dockerfile']!r} does not exist in "
            f"{project.root}: fix the path (it is relative to the directory of pyproject.toml)"
        )
    if "no_scale" in fields:
        no_scale = fields.pop("no_scale")
        fields.setdefault("app_scale_settings", not no_scale)
        project.warnings.append(
            f"{where}: no_scale is deprecated: use app_scale_settings = "
            f"{'false' if no_scale else 'true'} instead"
        )


# -- resolving refs ---------------------------------------------------------------------------


def resolve_target(ref: str | None, cwd: Path) -> Target:
    """The app named by ``ref`` (None: the single app of ``[tool.fal.apps]``)."""
    from falcli.packaging import loader as _loader

    cwd = cwd.resolve()
    project = find_project(cwd)
    if ref is None:
        return _from_config(_single_app(project, cwd), project)  # type: ignore[arg-type]
    if project is not None and ref in project.apps:
        return _from_config(project.apps[ref], project)
    if "::" in ref or ref.endswith(".py"):
        return _from_file_ref(ref, cwd, project)
    if _ENTRY_POINT.fullmatch(ref):
        root = project.root if project else cwd
        obj = _loader.load_entry_point(ref, root, where=f"ref {ref!r}")
        return Target(project=project, app_key=None, obj=obj, config=None, root=root)
    raise ConfigError(_unknown_ref_message(ref, project))


def _single_app(project: Project | None, cwd: Path) -> AppConfig:
    if project is None or not project.apps:
        raise ConfigError(
            f"no app given and no pyproject.toml with [tool.fal.apps] entries in {cwd} or "
            "above: pass a ref, e.g. `fal run app.py::MyApp`, or add "
            '[tool.fal.apps] my-app = { ref = "app.py::MyApp" }'
        )
    if len(project.apps) > 1:
        keys = ", ".join(sorted(project.apps))
        raise ConfigError(
            f"{project.pyproject} defines several apps ({keys}): name one, "
            f"e.g. `fal run {sorted(project.apps)[0]}`"
        )
    return next(iter(project.apps.values()))


def _from_config(config: AppConfig, project: Project) -> Target:
    from falcli.packaging import loader as _loader

    where = f"[tool.fal.apps.{config.key}]"
    if config.python_entry_point:
        obj = _loader.load_entry_point(config.python_entry_point, project.root, where=where)
    elif config.ref:
        obj = _loader.load_file_ref(config.ref, project.root, project.root, where=where)
    else:
        raise ConfigError(
            f"{where}: image-only apps (no ref or python_entry_point) cannot be run by this "
            'platform yet: add ref = "app.py::MyApp" or python_entry_point'
        )
    return Target(project=project, app_key=config.key, obj=obj, config=config, root=project.root)


def _from_file_ref(ref: str, cwd: Path, project: Project | None) -> Target:
    from falcli.packaging import loader as _loader

    root = project.root if project else cwd
    path_text, _, _name = ref.partition("::")
    base = cwd if (cwd / path_text).is_file() or project is None else project.root
    obj = _loader.load_file_ref(ref, base, root, where=f"ref {ref!r}")
    config = _config_for_file(project, (base / path_text).resolve(), obj)
    key = config.key if config else None
    return Target(project=project, app_key=key, obj=obj, config=config, root=root)


def _config_for_file(project: Project | None, path: Path, obj: object) -> AppConfig | None:
    """The pyproject entry whose ref names the same object, so its fields still apply."""
    if project is None:
        return None
    for config in project.apps.values():
        if not config.ref:
            continue
        file_part, _, name = config.ref.partition("::")
        same_file = (project.root / file_part).resolve() == path
        if same_file and (not name or name == getattr(obj, "__name__", None)):
            return config
    return None


def _unknown_ref_message(ref: str, project: Project | None) -> str:
    if project is None or not project.apps:
        return (
            f"ref {ref!r} is not a file ref, an app key or a module:Symbol: use "
            "path/to/file.py::ClassName, e.g. `fal run app.py::MyApp`"
        )
    keys = sorted(project.apps)
    match = suggest(ref, keys)
    hint = f"did you mean {match!r}?" if match else f"use one of: {', '.join(keys)}"
    return f"ref {ref!r} is not an app of [tool.fal.apps] in {project.pyproject}: {hint}"
