"""Endpoint specs and the OpenAPI document of an app (contract 4 of docs/architecture.md).

``endpoint_specs`` and ``openapi_for`` work on the class (no instance, no ``setup()``), so
packaging derives the OpenAPI document locally, without starlette. The runner's ASGI app is
in ``falcli.serving``; ``asgi_app_for`` is re-exported here lazily for callers of contract 4.
"""

from __future__ import annotations

import inspect
import re
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, TypeAdapter, create_model

from falcli import __version__
from falcli.app import App, endpoint, endpoint_marks
from falcli.errors import ConfigError
from falcli.function import FalFunction
from falcli.naming import app_name_of

__all__ = ["EndpointSpec", "endpoint", "endpoint_specs", "openapi_for"]  # + asgi_app_for, lazily

_SCHEMA_REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class EndpointSpec:
    """One route. ``body_param`` names the single model parameter that receives the whole
    body; when None, the body's fields are passed as keyword arguments."""

    path: str
    attr: str
    is_websocket: bool
    body_model: type[BaseModel] | None
    response_model: Any | None
    body_param: str | None = None


# -- specs ---------------------------------------------------------------------------------


def endpoint_specs(cls: type | FalFunction) -> list[EndpointSpec]:
    """The routes of an App subclass (or the single POST / of a FalFunction)."""
    if isinstance(cls, FalFunction):
        return [_spec_for(cls.func, "/", cls.__name__, False, skip_self=False)]
    if not (isinstance(cls, type) and issubclass(cls, App)):
        raise TypeError(f"endpoint_specs() expects a fal.App subclass or a FalFunction: {cls!r}")
    return [
        _spec_for(func, mark.path, attr, mark.is_websocket, skip_self=True)
        for attr, func, mark in endpoint_marks(cls)
    ]


def _spec_for(
    func: Callable[..., Any], path: str, attr: str, is_websocket: bool, *, skip_self: bool
) -> EndpointSpec:
    hints = _type_hints(func, attr)
    params = list(inspect.signature(func).parameters.values())[1 if skip_self else 0 :]
    response = _response_model(hints.get("return"))
    if is_websocket:
        return EndpointSpec(path, attr, True, None, None)
    if len(params) == 1 and _is_model(hints.get(params[0].name)):
        return EndpointSpec(path, attr, False, hints[params[0].name], response, params[0].name)
    if not params:
        return EndpointSpec(path, attr, False, None, response)
    return EndpointSpec(path, attr, False, _fields_model(attr, params, hints), response)


def _type_hints(func: Callable[..., Any], attr: str) -> dict[str, Any]:
    try:
        return typing.get_type_hints(func, include_extras=True)
    except Exception as exc:
        raise ConfigError(
            f"endpoint {attr!r}: cannot resolve its type annotations ({exc}); define the "
            "models it uses at module level before the app class"
        ) from None


def _is_model(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_response_class(annotation: type) -> bool:
    # A starlette Response annotation means "no schema". If starlette was never imported,
    # the annotation cannot be one, and packaging stays free of starlette.
    responses = sys.modules.get("starlette.responses")
    return responses is not None and issubclass(annotation, responses.Response)


def _response_model(annotation: object) -> Any | None:
    if annotation is None or annotation is type(None):
        return None
    if isinstance(annotation, type) and _is_response_class(annotation):
        return None
    return annotation


def _fields_model(
    attr: str, params: list[inspect.Parameter], hints: dict[str, Any]
) -> type[BaseModel]:
    """A body model whose fields are the endpoint's parameters (defaults honoured)."""
    fields: dict[str, Any] = {}
    for param in params:
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints.get(param.name, Any), default)
    name = "".join(part.capitalize() for part in re.split(r"[_\W]+", attr) if part) + "Input"
    try:
        return create_model(name or "Input", **fields)
    except Exception as exc:
        raise ConfigError(
            f"endpoint {attr!r}: cannot build a request model from its parameters ({exc}); "
            "rename the offending parameter or take one pydantic model instead"
        ) from None


# -- OpenAPI -------------------------------------------------------------------------------


def openapi_for(cls: type | FalFunction) -> dict[str, Any]:
    """OpenAPI 3.1 document of an app, from its pydantic models; nothing is instantiated."""
    if isinstance(cls, FalFunction) and isinstance(cls.metadata.get("openapi"), dict):
        return dict(cls.metadata["openapi"])
    specs = [s for s in endpoint_specs(cls) if not s.is_websocket]
    schemas, components = _schemas(specs)
    paths = {spec.path: {"post": _operation(spec, schemas)} for spec in specs}
    return {
        "openapi": "3.1.0",
        "info": {"title": app_name_of(cls), "version": __version__},
        "paths": paths,
        "components": {"schemas": components},
    }


def _schemas(specs: list[EndpointSpec]) -> tuple[dict[Any, Any], dict[str, Any]]:
    inputs: list[tuple[Any, Any, TypeAdapter[Any]]] = []
    for spec in specs:
        if spec.body_model is not None:
            inputs.append(((spec.attr, "in"), "validation", TypeAdapter(spec.body_model)))
        if spec.response_model is not None:
            inputs.append(((spec.attr, "out"), "serialization", TypeAdapter(spec.response_model)))
    if not inputs:
        return {}, {}
    by_key, defs = TypeAdapter.json_schemas(inputs, ref_template=_SCHEMA_REF)
    return {key: schema for (key, _mode), schema in by_key.items()}, defs.get("$defs", {})


def _operation(spec: EndpointSpec, schemas: dict[Any, Any]) -> dict[str, Any]:
    out_schema = schemas.get((spec.attr, "out"))
    ok: dict[str, Any] = {"description": "Successful Response"}
    if out_schema is not None:
        ok["content"] = {"application/json": {"schema": out_schema}}
    operation: dict[str, Any] = {"operationId": spec.attr, "responses": {"200": ok}}
    in_schema = schemas.get((spec.attr, "in"))
    if in_schema is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": in_schema}},
        }
        operation["responses"]["422"] = {"description": "Validation Error"}
    return operation


def __getattr__(name: str) -> Any:
    if name == "asgi_app_for":
        from falcli.serving import asgi_app_for

        return asgi_app_for
    raise AttributeError(f"module 'falcli.endpoints' has no attribute {name!r}")
