"""``fal.App``: the base class of an app, its option checking, and its lifecycle hooks.

Options are checked when the class is defined (``__init_subclass__``), so a typo fails on
the user's machine, not on a runner. Only options set explicitly (on the class, as a class
keyword, or on a user base class) are recorded in ``cls.__fal_options__``; packaging applies
the precedence CLI flag > explicit > pyproject > default on top.

An App is instantiated only inside a runner (``instantiate``): ``MyApp()`` elsewhere is an
error, and ``__init__`` cannot be overridden because a runner never passes arguments.
The ``endpoint`` decorator lives here rather than in falcli.endpoints so ``import fal``
stays free of starlette and pydantic; falcli.endpoints turns the marks into routes.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from falcli.errors import AppInstantiationError, ConfigError
from falcli.options import ALIASES, OPTIONS, check_known, suggest, validate_option

__all__ = ["HOOKS", "App", "EndpointMark", "call_hook", "endpoint", "endpoint_marks", "instantiate"]

_F = TypeVar("_F", bound=Callable[..., Any])
_A = TypeVar("_A", bound="App")
HOOKS = ("setup", "teardown", "handle_exit")
_OPTION_NAMES = (*OPTIONS, *ALIASES)
# A class attribute this close to an option name is taken as a misspelt option.
_TYPO_CUTOFF = 0.8


@dataclass(frozen=True)
class EndpointMark:
    """What ``@endpoint`` records on a method (as ``__fal_endpoint__``)."""

    path: str
    is_websocket: bool = False


def endpoint(path: str, *, is_websocket: bool = False) -> Callable[[_F], _F]:
    """Expose a method as POST ``path`` (or a websocket route with ``is_websocket=True``)."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(
            f"@fal.endpoint({path!r}): the path must be a string starting with '/', "
            'e.g. @fal.endpoint("/generate")'
        )

    def mark(func: _F) -> _F:
        func.__fal_endpoint__ = EndpointMark(path, is_websocket)  # type: ignore[attr-defined]
        return func

    return mark


class App:
    """Subclass it, set options as class attributes or keywords, add ``@fal.endpoint``s."""

    __fal_options__: ClassVar[dict[str, object]] = {}

    def __init_subclass__(cls, **keywords: Any) -> None:
        super().__init_subclass__()
        where = f"class {cls.__qualname__}"
        _refuse_init_override(cls, where)
        options = _inherited_options(cls, where)
        options.update(_own_options(cls, keywords, where))
        cls.__fal_options__ = options
        _check_endpoints(cls, where)

    def __init__(self) -> None:
        name = type(self).__name__
        raise AppInstantiationError(
            f"{name}() cannot be created here: an App is instantiated by its runner, which "
            f"then calls setup(). Serve it with `fal run path/to/file.py::{name}` (or "
            "`fal deploy`), and move initialisation code into setup()"
        )

    def setup(self) -> None:
        """Runs once per runner before the first request (load models here)."""

    def teardown(self) -> None:
        """Runs once when the runner stops, after in-flight requests finish."""

    def handle_exit(self) -> None:
        """Runs as soon as the runner receives SIGTERM (tell long requests to stop)."""


def instantiate(cls: type[_A]) -> _A:
    """Create an App instance bypassing the guard; for the runner agent only."""
    if not (isinstance(cls, type) and issubclass(cls, App)):
        raise TypeError(f"instantiate() expects a fal.App subclass, got {cls!r}")
    return object.__new__(cls)


async def call_hook(instance: object, name: str) -> None:
    """Run lifecycle hook ``name`` of ``instance``: async on the loop, sync in a thread."""
    if name not in HOOKS:
        raise ValueError(f"unknown lifecycle hook {name!r}: expected one of {', '.join(HOOKS)}")
    hook = getattr(instance, name, None)
    if hook is None:
        return
    if inspect.iscoroutinefunction(hook):
        await hook()
        return
    import asyncio  # lazily: asyncio is not needed to define an app

    result = await asyncio.to_thread(hook)
    if inspect.isawaitable(result):
        await result


def endpoint_marks(cls: type) -> Iterator[tuple[str, Callable[..., Any], EndpointMark]]:
    """(attribute, function, mark) of every endpoint of ``cls``, bases first, overrides
    replacing the base's definition in place."""
    found: dict[str, tuple[Callable[..., Any], EndpointMark]] = {}
    for klass in reversed(cls.__mro__):
        for attr, value in vars(klass).items():
            mark = getattr(value, "__fal_endpoint__", None)
            if isinstance(mark, EndpointMark):
                found[attr] = (value, mark)
            elif attr in found:
                del found[attr]  # overridden by a plain method: no longer an endpoint
    for attr, (func, mark) in found.items():
        yield attr, func, mark


# -- class definition checks --------------------------------------------------------------


def _refuse_init_override(cls: type, where: str) -> None:
    if "__init__" in vars(cls):
        raise AppInstantiationError(
            f"{where}: overriding __init__ is not supported: a runner creates the instance "
            "without arguments. Move initialisation into `def setup(self)`, which runs once "
            "per runner before the first request"
        )


def _inherited_options(cls: type, where: str) -> dict[str, object]:
    """Options from base classes: App subclasses' records, and plain mixins' attributes."""
    options: dict[str, object] = {}
    for base in reversed(cls.__mro__[1:]):
        if base is object or base is App:
            continue
        if "__fal_options__" in vars(base):
            options.update(vars(base)["__fal_options__"])
        else:
            mixin = {k: v for k, v in vars(base).items() if k in _OPTION_NAMES and _is_data(k, v)}
            options.update(_validated(mixin, f"{where} (base {base.__qualname__})"))
    return options


def _own_options(cls: type, keywords: dict[str, Any], where: str) -> dict[str, object]:
    check_known(keywords, where=f"{where} keywords")
    body = {k: v for k, v in vars(cls).items() if _is_option_attempt(k, v, where)}
    both = sorted(set(body) & set(keywords))
    if both:
        raise ConfigError(
            f"{where}: option {both[0]!r} is set both as a class attribute and as a class "
            "keyword; keep only one of them"
        )
    return _validated({**body, **keywords}, where)


def _is_option_attempt(name: str, value: object, where: str) -> bool:
    """True for option names; raise for a plain data attribute that looks like a typo."""
    if not _is_data(name, value):
        return False  # e.g. an endpoint method named health_check is not the option
    if name in _OPTION_NAMES:
        return True
    match = suggest(name, _OPTION_NAMES, cutoff=_TYPO_CUTOFF)
    if match:
        check_known([name], where=where)  # raises with the "did you mean" hint
    return False


def _is_data(name: str, value: object) -> bool:
    callable_or_descriptor = callable(value) or hasattr(type(value), "__get__")
    return not name.startswith("_") and not callable_or_descriptor


def _validated(raw: dict[str, object], where: str) -> dict[str, object]:
    """Validate and normalise; host_kwargs entries come first so direct options win."""
    direct: dict[str, object] = {}
    from_host: dict[str, object] = {}
    for name, value in raw.items():
        checked = validate_option(name, value, where=where)
        if ALIASES.get(name, name) == "host_kwargs":
            assert isinstance(checked, dict)
            from_host.update(checked)
        else:
            direct[ALIASES.get(name, name)] = checked
    return {**from_host, **direct}


def _check_endpoints(cls: type, where: str) -> None:
    seen: dict[tuple[str, bool], str] = {}
    for attr, func, mark in endpoint_marks(cls):
        key = (mark.path, mark.is_websocket)
        if key in seen:
            raise ConfigError(
                f"{where}: endpoints {seen[key]!r} and {attr!r} both use path {mark.path!r}; "
                "give each endpoint its own path"
            )
        seen[key] = attr
        _check_endpoint_signature(func, attr, mark, where)
        _resolve_annotations(func)


def _check_endpoint_signature(
    func: Callable[..., Any], attr: str, mark: EndpointMark, where: str
) -> None:
    if not inspect.isfunction(func):
        raise ConfigError(f"{where}: endpoint {attr!r} must be a plain method (def or async def)")
    params = list(inspect.signature(func).parameters.values())[1:]  # drop self
    if mark.is_websocket and (not inspect.iscoroutinefunction(func) or len(params) != 1):
        raise ConfigError(
            f"{where}: websocket endpoint {attr!r} must be `async def {attr}(self, websocket)`"
        )
    for param in params:
        if param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            raise ConfigError(
                f"{where}: endpoint {attr!r} parameter {param.name!r} is {param.kind.description}"
                "; endpoint parameters must be named (the JSON body fields), e.g. "
                f"def {attr}(self, prompt: str, steps: int = 30)"
            )


def _resolve_annotations(func: Callable[..., Any]) -> None:
    """Replace string annotations by the objects they name, so the pickled class carries
    the real models; a forward reference not yet defined is left for later resolution."""
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception:  # NameError and friends: resolved again when specs are built
        return
    func.__annotations__ = hints
