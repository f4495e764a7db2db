"""``@fal.function`` (a single function deployed as an app) and ``fal.ContainerImage``.

Here both are declared, validated and packaged; building images and serving custom servers
(``exposed_port``) belong to the service. A ``FalFunction`` keeps the same
``__fal_options__`` convention as ``fal.App`` subclasses: only the options set explicitly,
validated and normalised, so packaging can apply CLI > explicit > pyproject > default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, overload

from falcli.errors import OptionError
from falcli.options import OPTIONS, check_known, validate_option

__all__ = ["ContainerImage", "FalFunction", "function"]

_F = TypeVar("_F", bound=Callable[..., Any])
_KINDS = ("virtualenv", "container")
# Arguments of @fal.function that are not app options.
_FUNCTION_ONLY = ("setup_function", "serve", "metadata")


def _str_or_list(value: object, what: str) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    raise OptionError(
        f"ContainerImage: {what} = {value!r} is invalid: expected a string or a list of "
        f'strings, e.g. {what}=["python", "-m", "server"]'
    )


def _str_dict(value: object, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        return dict(value)
    # Values are not echoed: build secrets may hold tokens.
    raise OptionError(
        f"ContainerImage: {what} (a {type(value).__name__}) is invalid: expected a dict of "
        "strings to "
        f'strings, e.g. {what}={{"CUDA_VERSION": "12.4"}}'
    )


def _registries(value: object) -> dict[str, dict[str, str]]:
    if value is None:
        return {}
    fix = 'e.g. registries={"registry.example.com": {"username": "me", "password": "$TOKEN"}}'
    if not isinstance(value, Mapping):
        raise OptionError(f"ContainerImage: registries must be a dict of registry hosts, {fix}")
    out: dict[str, dict[str, str]] = {}
    for host, creds in value.items():
        if not isinstance(host, str) or not isinstance(creds, Mapping):
            raise OptionError(f"ContainerImage: registries entry {host!r} is invalid: {fix}")
        missing = [k for k in ("username", "password") if not isinstance(creds.get(k), str)]
        if missing or not all(isinstance(v, str) for v in creds.values()):
            # Never echo the credentials themselves.
            bad = ", ".join(missing) or "another key"
            raise OptionError(
                f"ContainerImage: registries entry {host!r} needs string 'username' and "
                f"'password' (missing or not a string: {bad}), {fix}"
            )
        out[host] = dict(creds)
    return out


@dataclass(frozen=True)
class ContainerImage:
    """A Dockerfile-based image: inline text (``dockerfile_str``) or a path (``dockerfile``)."""

    dockerfile_str: str | None = None
    dockerfile: str | None = None
    build_args: dict[str, str] = field(default_factory=dict)
    registries: dict[str, dict[str, str]] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    entrypoint: str | list[str] | None = None
    cmd: str | list[str] | None = None

    def __post_init__(self) -> None:
        if (self.dockerfile_str is None) == (self.dockerfile is None):
            raise OptionError(
                "ContainerImage: give exactly one of dockerfile_str (the Dockerfile text) or "
                'dockerfile (a path), e.g. ContainerImage.from_dockerfile("Dockerfile")'
            )
        for name in ("dockerfile_str", "dockerfile"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise OptionError(
                    f"ContainerImage: {name} = {value!r} is invalid: expected a non-empty "
                    'string, e.g. ContainerImage.from_dockerfile_str("FROM python:3.11")'
                )
        object.__setattr__(self, "build_args", _str_dict(self.build_args, "build_args"))
        object.__setattr__(self, "secrets", _str_dict(self.secrets, "secrets"))
        object.__setattr__(self, "registries", _registries(self.registries))
        object.__setattr__(self, "entrypoint", _str_or_list(self.entrypoint, "entrypoint"))
        object.__setattr__(self, "cmd", _str_or_list(self.cmd, "cmd"))

    @classmethod
    def from_dockerfile_str(
        cls,
        text: str,
        *,
        build_args: Mapping[str, str] | None = None,
        registries: Mapping[str, Mapping[str, str]] | None = None,
        secrets: Mapping[str, str] | None = None,
        entrypoint: str | list[str] | None = None,
        cmd: str | list[str] | None = None,
    ) -> ContainerImage:
        """An image built from Dockerfile text."""
        return cls(
            dockerfile_str=text,
            build_args=build_args or {},  # type: ignore[arg-type]
            registries=registries or {},  # type: ignore[arg-type]
            secrets=secrets or {},  # type: ignore[arg-type]
            entrypoint=entrypoint,
            cmd=cmd,
        )

    @classmethod
    def from_dockerfile(cls, path: str | Path, **kwargs: Any) -> ContainerImage:
        """An image built from the Dockerfile at ``path``, read now (it ships as text)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise OptionError(
                f"ContainerImage.from_dockerfile: cannot read {str(path)!r}: {exc.strerror}; "
                "pass the path of an existing Dockerfile"
            ) from None
        return cls.from_dockerfile_str(text, **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ContainerImage:
        """Inverse of ``to_dict``; also reads a ``[tool.fal.apps.X.image]`` table."""
        known = [f for f in cls.__dataclass_fields__]
        check_known(data, where="image", known=known)
        return cls(**data)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        """The JSON form stored in the manifest's ``image`` option."""
        return {
            "dockerfile_str": self.dockerfile_str,
            "dockerfile": self.dockerfile,
            "build_args": dict(self.build_args),
            "registries": {k: dict(v) for k, v in self.registries.items()},
            "secrets": dict(self.secrets),
            "entrypoint": self.entrypoint,
            "cmd": self.cmd,
        }


class FalFunction:
    """A function plus its explicitly set, validated options (``__fal_options__``).

    Calling it runs the function here, in this process; ``fal run`` serves it remotely as
    POST ``/`` (or forwards to ``exposed_port`` for a custom server).
    """

    def __init__(
        self,
        func: Callable[..., Any],
        options: dict[str, object],
        *,
        kind: str = "virtualenv",
        setup_function: Callable[[], Any] | None = None,
        serve: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.func = func
        self.__fal_options__ = options
        self.kind = kind
        self.setup_function = setup_function
        self.serve = serve
        self.metadata = metadata or {}
        self.__name__ = getattr(func, "__name__", "function")
        self.__qualname__ = getattr(func, "__qualname__", self.__name__)
        self.__doc__ = func.__doc__
        self.__module__ = getattr(func, "__module__", __name__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<FalFunction {self.__qualname__} options={self.__fal_options__!r}>"


def _check_extras(
    where: str, options: Mapping[str, object], setup_function: object, serve: object,
    metadata: object,
) -> None:  # fmt: skip
    if setup_function is not None and not callable(setup_function):
        raise OptionError(
            f"{where}: setup_function = {setup_function!r} is invalid: expected a callable "
            "taking no arguments, e.g. setup_function=load_model"
        )
    if not isinstance(serve, bool):
        raise OptionError(f"{where}: serve = {serve!r} is invalid: expected True or False")
    if metadata is not None and not isinstance(metadata, dict):
        raise OptionError(
            f"{where}: metadata = {metadata!r} is invalid: expected a dict, "
            'e.g. metadata={"openapi": {...}}'
        )
    has_openapi = isinstance(metadata, dict) and isinstance(metadata.get("openapi"), dict)
    if options.get("exposed_port") is not None and not has_openapi:
        raise OptionError(
            f"{where}: exposed_port = {options['exposed_port']!r} needs an OpenAPI document: "
            'pass metadata={"openapi": {...}} (the platform cannot derive one from a custom '
            "server)"
        )


def _make(func: Callable[..., Any], kind: str, config: dict[str, Any]) -> FalFunction:
    where = f"@fal.function on {getattr(func, '__qualname__', func)!r}"
    if not callable(func):
        raise OptionError(f"{where}: expected a function to decorate, got {func!r}")
    extras = {k: config.pop(k, None) for k in _FUNCTION_ONLY}
    check_known(config, where=where, known=[*OPTIONS, "app_auth"])
    options = {name: validate_option(name, value, where=where) for name, value in config.items()}
    serve = False if extras["serve"] is None else extras["serve"]
    _check_extras(where, options, extras["setup_function"], serve, extras["metadata"])
    return FalFunction(
        func, options, kind=kind, setup_function=extras["setup_function"], serve=serve,
        metadata=extras["metadata"],
    )  # fmt: skip


@overload
def function(kind: _F, /) -> FalFunction: ...
@overload
def function(kind: str = "virtualenv", /, **config: Any) -> Callable[[_F], FalFunction]: ...
def function(kind: Any = "virtualenv", /, **config: Any) -> Any:
    """Declare a function as an app: ``@fal.function`` or ``@fal.function(keep_alive=300)``.

    ``kind`` is "virtualenv" (default) or "container" (needs ``image=``). Options are the app
    options of falcli.options plus setup_function, serve and metadata.
    """
    if callable(kind):
        return _make(kind, "virtualenv", dict(config))
    if kind not in _KINDS:
        raise OptionError(
            f"@fal.function: kind = {kind!r} is invalid: expected one of "
            f'{", ".join(map(repr, _KINDS))}, e.g. @fal.function("container", image=...)'
        )
    if kind == "container" and config.get("image") is None:
        raise OptionError(
            '@fal.function("container"): image is required, e.g. '
            'image=fal.ContainerImage.from_dockerfile("Dockerfile")'
        )
    return lambda func: _make(func, kind, dict(config))
