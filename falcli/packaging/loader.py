"""Import the user's code and find the app in it: the object a ref names.

A file is imported under a stable module name: its dotted path relative to the project root
when every part is an identifier (``src/app.py`` -> ``src.app``), so that pickling by value
and the file's own relative and local imports behave as they do under ``python -m``. The
project root and the file's directory go on ``sys.path`` first. Any exception raised while
importing becomes a ConfigError carrying the user's part of the traceback.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import keyword
import re
import sys
import traceback
import types
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from falcli.errors import ConfigError, FalError
from falcli.options import suggest

if TYPE_CHECKING:
    from falcli.function import FalFunction

__all__ = [
    "ensure_on_path",
    "find_apps",
    "import_file",
    "is_app",
    "load_entry_point",
    "load_file_ref",
    "traceback_tail",
]

_TAIL_LINES = 20
_FALCLI_DIR = str(Path(__file__).resolve().parents[1]) + "/"


def ensure_on_path(*dirs: Path) -> None:
    """Put ``dirs`` at the front of sys.path (once, in the given order)."""
    for directory in reversed(dirs):
        text = str(directory)
        if text in sys.path:
            sys.path.remove(text)
        sys.path.insert(0, text)


def is_app(obj: object) -> bool:
    """True for a ``fal.App`` subclass (not App itself) or a ``FalFunction``."""
    from falcli.app import App
    from falcli.function import FalFunction

    if isinstance(obj, FalFunction):
        return True
    return isinstance(obj, type) and issubclass(obj, App) and obj is not App


def find_apps(module: types.ModuleType) -> dict[str, type | FalFunction]:
    """The apps *defined* in ``module`` (imported ones are not its apps), by name."""
    return {
        name: obj
        for name, obj in vars(module).items()
        if is_app(obj) and getattr(obj, "__module__", None) == module.__name__
    }


def load_file_ref(ref: str, base: Path, root: Path, *, where: str) -> type | FalFunction:
    """The object of ``path.py::Name`` (or the single app of ``path.py``), path under base."""
    path_text, _, name = ref.partition("::")
    path = (base / path_text).resolve()
    if not path.is_file():
        raise ConfigError(
            f"{where}: file {path_text!r} does not exist in {base}: fix the path, "
            "e.g. src/app.py::MyApp"
        )
    module = import_file(path, root, where=where)
    apps = find_apps(module)
    if name:
        return _named(module, name, apps, where, path_text)
    if len(apps) == 1:
        return next(iter(apps.values()))
    if not apps:
        raise ConfigError(
            f"{where}: {path_text} defines no fal.App subclass or @fal.function: define one, "
            f"or name the object, e.g. {path_text}::MyApp"
        )
    names = ", ".join(sorted(apps))
    raise ConfigError(
        f"{where}: {path_text} defines several apps ({names}): name one, "
        f"e.g. {path_text}::{sorted(apps)[0]}"
    )


def _named(
    module: types.ModuleType, name: str, apps: Mapping[str, object], where: str, path_text: str
) -> type | FalFunction:
    obj = module
    for part in name.split("."):
        obj = getattr(obj, part, None)  # type: ignore[assignment]
        if obj is None:
            match = suggest(name, apps) if apps else None
            hint = f"did you mean {match!r}?" if match else _listing(apps)
            raise ConfigError(f"{where}: {path_text} has no class or function {name!r}: {hint}")
    if not is_app(obj):
        raise ConfigError(
            f"{where}: {name!r} in {path_text} is a {type(obj).__name__}, not a fal.App "
            f"subclass or @fal.function: {_listing(apps)}"
        )
    return obj  # type: ignore[return-value]


def _listing(apps: Mapping[str, object]) -> str:
    if not apps:
        return "define a class that subclasses fal.App"
    return "apps defined there: " + ", ".join(sorted(apps))


def load_entry_point(entry: str, root: Path, *, where: str) -> type | FalFunction:
    """The object of ``package.module:Symbol``, importable from the root (or root/src)."""
    module_name, _, symbol = entry.partition(":")
    ensure_on_path(*[d for d in (root, root / "src") if d.is_dir()])
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(
                f"{where}: cannot import module {module_name!r} of {entry!r} from {root}: "
                "install the project (pip install -e .) or fix python_entry_point"
            ) from None
        raise _import_failed(where, module_name, exc) from None
    except (Exception, SystemExit) as exc:
        raise _import_failed(where, module_name, exc) from None
    return _named(module, symbol, find_apps(module), where, module_name)


def import_file(path: Path, root: Path, *, where: str) -> types.ModuleType:
    """Import the file at ``path`` under a stable name (see the module docstring)."""
    ensure_on_path(root, path.parent)
    name = _module_name(path, root)
    existing = sys.modules.get(name)
    if existing is not None and _file_of(existing) == path:
        return existing
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{where}: cannot import {path}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(name, None)
        raise _import_failed(where, str(path), exc) from None
    return module


def _file_of(module: types.ModuleType) -> Path | None:
    file = getattr(module, "__file__", None)
    return Path(file).resolve() if file else None


def _module_name(path: Path, root: Path) -> str:
    try:
        parts = path.relative_to(root.resolve()).with_suffix("").parts
    except ValueError:
        parts = ()
    if parts and all(p.isidentifier() and not keyword.iskeyword(p) for p in parts):
        return ".".join(parts)
    # Outside the root or not importable by name: a name unique to the file.
    stem = re.sub(r"\W", "_", path.stem)
    return f"_fal_app_{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def _import_failed(where: str, what: str, exc: BaseException) -> ConfigError:
    if isinstance(exc, FalError):  # the SDK refused the app at class definition: its message
        at = _user_frames(exc)[-1:]  # already names the option, value and fix; add the line
        place = f" ({at[0].filename}:{at[0].lineno})" if at else ""
        return ConfigError(f"{where}: {exc}{place}")
    return ConfigError(
        f"{where}: importing {what} raised {type(exc).__name__}: {exc}. Fix the error "
        f"(traceback below) and retry:\n{traceback_tail(exc)}"
    )


def _user_frames(exc: BaseException) -> list[traceback.FrameSummary]:
    """The frames of ``exc``'s traceback outside importlib and falcli itself."""
    return [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(("<frozen", _FALCLI_DIR))
    ]


def traceback_tail(exc: BaseException) -> str:
    """The traceback of ``exc`` without importlib's and falcli's own frames."""
    frames = _user_frames(exc)
    lines = traceback.format_list(frames) + traceback.format_exception_only(type(exc), exc)
    text = "".join(["Traceback (most recent call last):\n", *lines]).rstrip("\n")
    return "\n".join(text.splitlines()[-_TAIL_LINES:])
