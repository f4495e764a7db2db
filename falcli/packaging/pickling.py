"""Deterministic cloudpickle of an App class or FalFunction: the bundle's payload blob.

The user's own modules are pickled by value (the runner does not have them); installed
packages by reference (the runner's environment installs them). "The user's own modules"
are the modules whose file lies under the project root and not inside a virtualenv or
site-packages, plus ``local_python_modules`` and their submodules.

Plain cloudpickle output varies between processes for the same class, which would change the
bundle hash on every run. Three sources are neutralised here:

- class tracker ids (cloudpickle draws a uuid4 per dynamic class): replaced by a digest of
  the class's module, qualname and order of appearance;
- string sets (their order follows the per-process hash seed): sets and frozensets that are
  code constants, class attributes or function globals are pickled sorted;
- pydantic models carry ``id(cls)`` inside their core schema: the derived schema, validator
  and serializer are dropped and rebuilt by ``model_rebuild`` when the runner unpickles.

Caveat: a set nested deeper (e.g. a set inside a dict held in a class attribute) keeps
hash-seed order, so such a payload hashes differently per process (still correct to run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import sys
import sysconfig
import types
import typing
from collections import ChainMap
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cloudpickle
from cloudpickle import cloudpickle as _cp

from falcli.errors import PackagingError

__all__ = ["by_value_modules", "dumps", "rebuild_pydantic_model"]

_PROTOCOL = 5
_PYDANTIC_DERIVED = (
    "__pydantic_core_schema__",
    "__pydantic_validator__",
    "__pydantic_serializer__",
)
# Never by value: the runner environment always has these installed.
_ALWAYS_BY_REFERENCE = ("falcli", "fal", "cloudpickle", "pydantic")


class _Sorted:
    """Stands in for a set while pickling; unpickles as the set, built from sorted items."""

    def __init__(self, kind: type, items: list[Any]) -> None:
        self.kind, self.items = kind, items

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.kind, (self.items,))


def _canon(value: Any) -> Any:
    if type(value) in (set, frozenset):
        try:
            return _Sorted(type(value), sorted(value))
        except TypeError:  # unorderable members: leave as is
            return value
    return value


def _code_reduce(code: types.CodeType) -> tuple[Any, ...]:
    fn, args = _cp._code_reduce(code)
    return fn, tuple(tuple(map(_canon, a)) if isinstance(a, tuple) else a for a in args)


def rebuild_pydantic_model(cls: type, state: tuple[dict[str, Any], dict[str, Any]]) -> type:
    """Runner side: restore a by-value pydantic model, then rebuild its dropped schema."""
    _cp._class_setstate(cls, state)
    # The metaclass already built a schema, validator and serializer for the empty class
    # body cloudpickle created; drop them so the rebuild cannot reuse them (pydantic >= 2.14
    # reuses a complete-looking core schema it finds on the class).
    for key in _PYDANTIC_DERIVED:
        if key in cls.__dict__:
            delattr(cls, key)
    cls.__pydantic_complete__ = False  # type: ignore[attr-defined]
    cls.model_rebuild(force=True)  # type: ignore[attr-defined]
    return cls


def _is_pydantic_model(cls: type) -> bool:
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and issubclass(cls, pydantic.BaseModel)


def _canon_decorators(infos: Any, ref: str) -> Any:
    # cls_ref embeds id(cls); pydantic uses it only in an error message.
    changes = {
        f.name: {k: dataclasses.replace(d, cls_ref=ref) for k, d in getattr(infos, f.name).items()}
        for f in dataclasses.fields(infos)
    }
    return type(infos)(**changes)


class _Pickler(cloudpickle.Pickler):
    dispatch_table = ChainMap({types.CodeType: _code_reduce}, cloudpickle.Pickler.dispatch_table)

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=_PROTOCOL)
        self._classes = 0

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type) and not _cp._should_pickle_by_reference(obj):
            return self._class_reduce(obj)
        rv = super().reducer_override(obj)
        if isinstance(obj, types.FunctionType) and isinstance(rv, tuple) and len(rv) == 6:
            fn, args, (state, slots), items, kv, setter = rv
            if "__globals__" in slots:
                slots = {**slots, "__globals__": _canon_dict(slots["__globals__"])}
            if "__annotations__" in slots:
                slots = {**slots, "__annotations__": _evaluated(obj, slots["__annotations__"])}
            return fn, args, (state, slots), items, kv, setter
        return rv

    def _class_reduce(self, cls: type) -> Any:
        self._classes += 1
        tracker = f"{cls.__module__}:{cls.__qualname__}:{self._classes}"
        tracker_id = hashlib.sha256(tracker.encode()).hexdigest()[:32]
        _cp._DYNAMIC_CLASS_TRACKER_BY_CLASS[cls] = tracker_id
        _cp._DYNAMIC_CLASS_TRACKER_BY_ID[tracker_id] = cls
        rv = super().reducer_override(cls)
        if not (isinstance(rv, tuple) and len(rv) == 6):
            return rv
        fn, args, (state, slots), items, kv, setter = rv
        state = _canon_dict(state)
        if _is_pydantic_model(cls):
            for key in _PYDANTIC_DERIVED:
                state.pop(key, None)
            ref = f"{cls.__module__}.{cls.__qualname__}"
            if "__pydantic_decorators__" in state:
                state["__pydantic_decorators__"] = _canon_decorators(
                    state["__pydantic_decorators__"], ref
                )
            setter = rebuild_pydantic_model
        return fn, args, (state, slots), items, kv, setter


def _evaluated(func: types.FunctionType, annotations: dict[str, Any]) -> dict[str, Any]:
    """String annotations (``from __future__ import annotations``) evaluated here: the
    runner only gets the globals a function's code uses, which may not cover its hints."""
    if not any(isinstance(v, str) for v in annotations.values()):
        return annotations
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception:  # unresolvable here too: ship as written
        return annotations
    return {name: hints.get(name, value) for name, value in annotations.items()}


def _canon_dict(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _canon(v) for k, v in d.items()}


def dumps(obj: object, by_value: Iterable[types.ModuleType]) -> bytes:
    """Pickle ``obj``, with the given modules (and their submodules) pickled by value."""
    with _registered(by_value):
        buf = io.BytesIO()
        try:
            _Pickler(buf).dump(obj)
        except Exception as exc:
            name = getattr(obj, "__qualname__", repr(obj))
            raise PackagingError(
                f"cannot pickle {name}: {type(exc).__name__}: {exc}. Move the unpicklable "
                f"object (open file, lock, client, ...) into setup() so it is created on the runner"
            ) from exc
    return buf.getvalue()


@contextmanager
def _registered(modules: Iterable[types.ModuleType]) -> Iterator[None]:
    # The registry is process-global: leave it as it was found.
    added = [m for m in modules if m.__name__ not in cloudpickle.list_registry_pickle_by_value()]
    for module in added:
        cloudpickle.register_pickle_by_value(module)
    try:
        yield
    finally:
        for module in added:
            cloudpickle.unregister_pickle_by_value(module)


def _installed_dirs() -> list[Path]:
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return [Path(d).resolve() for d in dirs]


def _is_installed(file: Path, installed: list[Path]) -> bool:
    if any(p in ("site-packages", "dist-packages") for p in file.parts):
        return True
    if any(d == file or d in file.parents for d in installed):
        return True
    return any((parent / "pyvenv.cfg").exists() for parent in file.parents)


def by_value_modules(
    root: Path, local_modules: Iterable[str] = (), *, exclude: Iterable[str] = ()
) -> list[types.ModuleType]:
    """Loaded modules that belong to the user: under ``root`` and not installed, plus
    ``local_modules`` (imported if needed). ``exclude`` names top-level packages to keep
    by reference (a ``python_entry_point`` package the runner installs)."""
    root = root.resolve()
    installed = _installed_dirs()
    skip = set(_ALWAYS_BY_REFERENCE) | set(exclude)
    found: dict[str, types.ModuleType] = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not isinstance(module, types.ModuleType) or not file or name.split(".")[0] in skip:
            continue
        path = Path(file).resolve()
        if root in path.parents and not _is_installed(path, installed):
            found[name] = module
    for name in local_modules:
        found[name] = _import_local(name)
    return [found[name] for name in sorted(found)]


def _import_local(name: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise PackagingError(
            f"local_python_modules: cannot import {name!r}: {type(exc).__name__}: {exc}. "
            f"List module names importable from the project root, e.g. ['my_utils']"
        ) from exc
