"""Scaffolding for ``fal init`` / ``fal create app``: write a starter app, register it.

A template is a directory of ``templates/`` whose files are copied to ``src/<module>/`` with
two tokens replaced: ``__APP_NAME__`` (the app key, kebab-case) and ``__APP_CLASS__`` (its
PascalCase class name). Template files are valid Python as they stand, so they are linted
and tested like any code. The app is added to pyproject.toml as ``[tool.fal.apps.<name>]``
with tomlkit, which keeps every existing line, comment and format as it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import Table

from falcli.errors import ConfigError

__all__ = ["TEMPLATES_DIR", "CreatedApp", "create_app", "list_templates"]

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
_SKIP = ("__pycache__",)


@dataclass
class CreatedApp:
    """What ``create_app`` wrote: the app key, its ref, and every file it created/changed."""

    name: str
    template: str
    ref: str
    pyproject: Path
    files: list[Path]


def list_templates() -> dict[str, str]:
    """Template name -> the first line of its app's docstring (a one-line description)."""
    out: dict[str, str] = {}
    for directory in sorted(TEMPLATES_DIR.iterdir()):
        app = directory / "app.py"
        if app.is_file():
            out[directory.name] = _summary(app.read_text(encoding="utf-8"))
    return out


def _summary(source: str) -> str:
    match = re.match(r'\s*"""(.*)', source)
    line = match.group(1) if match else ""
    return line.removeprefix("__APP_NAME__: ").strip().rstrip('"')


def create_app(
    root: Path, name: str, template: str = "basic", *, force: bool = False
) -> CreatedApp:
    """Write template ``template`` as app ``name`` under ``root`` and add it to pyproject."""
    _check_name(name)
    source_dir = _template_dir(template)
    module = name.replace("-", "_")
    target_dir = root / "src" / module
    plan = {target_dir / rel: _render(src, name) for rel, src in _template_files(source_dir)}
    ref = f"src/{module}/app.py::{_class_name(name)}"
    pyproject = root / "pyproject.toml"
    new_toml = _with_app(pyproject, name, ref, force=force)
    _refuse_existing(plan, force)
    for path, text in plan.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    pyproject.write_text(new_toml, encoding="utf-8")
    return CreatedApp(name, template, ref, pyproject, [*plan, pyproject])


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name) or len(name) > 64:
        raise ConfigError(
            f"app name {name!r} is invalid: use lowercase letters, digits and single '-' "
            "between words, starting with a letter (at most 64), e.g. image-generator"
        )


def _template_dir(template: str) -> Path:
    available = list_templates()
    if template not in available:
        raise ConfigError(
            f"template {template!r} does not exist: choose one of {', '.join(available)}, "
            "e.g. --template basic"
        )
    return TEMPLATES_DIR / template


def _template_files(source_dir: Path) -> list[tuple[Path, Path]]:
    return [
        (path.relative_to(source_dir), path)
        for path in sorted(source_dir.rglob("*"))
        if path.is_file() and not any(part in _SKIP for part in path.parts)
    ]


def _class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("-"))


def _render(path: Path, name: str) -> str:
    text = path.read_text(encoding="utf-8")
    return text.replace("__APP_NAME__", name).replace("__APP_CLASS__", _class_name(name))


def _refuse_existing(plan: dict[Path, str], force: bool) -> None:
    existing = [str(p) for p in plan if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"{', '.join(existing)} already exists: pass --force to overwrite it, or choose "
            "another app name"
        )


def _with_app(pyproject: Path, name: str, ref: str, *, force: bool) -> str:
    """The pyproject text with ``[tool.fal.apps.<name>]`` added, all else untouched."""
    try:
        doc = tomlkit.parse(pyproject.read_text(encoding="utf-8")) if pyproject.exists() else None
    except TOMLKitError as exc:
        raise ConfigError(f"{pyproject}: invalid TOML: {exc}. Fix the syntax and retry") from None
    if doc is None:
        doc = tomlkit.document()
    apps = _super_table(_super_table(_super_table(doc, "tool"), "fal"), "apps")
    if name in apps and not force:
        raise ConfigError(
            f"{pyproject}: [tool.fal.apps.{name}] already exists: pass --force to replace it, "
            "or choose another app name"
        )
    entry = tomlkit.table()
    entry["ref"] = ref
    apps[name] = entry
    return tomlkit.dumps(doc)


def _super_table(parent: tomlkit.TOMLDocument | Table, key: str) -> Table:
    existing = parent.get(key)
    if existing is None:
        created = tomlkit.table(is_super_table=True)
        parent[key] = created
        return created
    if not isinstance(existing, Table):
        raise ConfigError(
            f"pyproject.toml: {key} must be a table to hold [tool.fal.apps], found "
            f"{type(existing).__name__}: make it a [table] (not an inline table or a value)"
        )
    return existing
