"""Serving an app: endpoint specs, the OpenAPI document, and the runner's ASGI app.

Contract 4 of docs/architecture.md. ``endpoint_specs`` and ``openapi_for`` work on the class
(no instance, no ``setup()``), so packaging derives the OpenAPI document locally. The ASGI
app is plain Starlette (FastAPI costs ~200 ms of cold start) and speaks fal's runner shapes:
POST endpoints, ``GET /health``, ``GET /openapi.json``, 404 ``{"detail": "Path /x not
found"}``, pydantic-style 422s and 500 ``{"detail": ...}`` with the traceback in the logs.

Every runner imports this module at cold start: keep its imports to starlette and pydantic.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError, create_model
from pydantic_core import to_jsonable_python
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketState

from falcli import __version__
from falcli.app import App, endpoint, endpoint_marks
from falcli.errors import ConfigError
from falcli.function import FalFunction
from falcli.naming import app_name_of

__all__ = ["EndpointSpec", "asgi_app_for", "endpoint", "endpoint_specs", "openapi_for"]

_log = logging.getLogger("falcli.endpoints")
_SCHEMA_REF = "#/components/schemas/{model}"
_MAX_DETAIL = 2000


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


def _response_model(annotation: object) -> Any | None:
    if annotation is None or annotation is type(None):
        return None
    if isinstance(annotation, type) and issubclass(annotation, Response):
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


# -- ASGI app ------------------------------------------------------------------------------


def asgi_app_for(instance: object) -> Starlette:
    """The runner's ASGI app for an App instance (after setup) or a FalFunction."""
    target: type | FalFunction = instance if isinstance(instance, FalFunction) else type(instance)
    if isinstance(instance, FalFunction) and instance.__fal_options__.get("exposed_port"):
        raise ConfigError(
            f"{instance.__name__}: a function with exposed_port is served by its own server "
            "on that port, not by falcli.endpoints"
        )
    routes: list[BaseRoute] = [_route(instance, spec) for spec in endpoint_specs(target)]
    routes.append(Route("/health", _health, methods=["GET"]))
    routes.append(Route("/openapi.json", _openapi_handler(target), methods=["GET"]))
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


def _route(instance: object, spec: EndpointSpec) -> BaseRoute:
    func = instance.func if isinstance(instance, FalFunction) else getattr(instance, spec.attr)
    if spec.is_websocket:
        return WebSocketRoute(spec.path, _websocket_handler(func, spec))
    return Route(spec.path, _post_handler(func, spec), methods=["POST"])


def _post_handler(func: Callable[..., Any], spec: EndpointSpec) -> Callable[..., Any]:
    is_async = inspect.iscoroutinefunction(func)

    async def handle(request: Request) -> Response:
        kwargs = await _parse_body(request, spec)
        if isinstance(kwargs, Response):
            return kwargs
        try:
            result = await func(**kwargs) if is_async else await run_in_threadpool(func, **kwargs)
            return _to_response(result)
        except HTTPException:
            raise  # the app chose a status code: the exception handler renders it
        except Exception as exc:
            _log.exception("endpoint %s (%s) failed", spec.path, spec.attr)
            detail = f"{type(exc).__name__}: {exc}"[:_MAX_DETAIL]
            return JSONResponse({"detail": detail}, status_code=500)

    return handle


async def _parse_body(request: Request, spec: EndpointSpec) -> dict[str, Any] | Response:
    """Keyword arguments for the endpoint, or a 422 response in pydantic's shape."""
    if spec.body_model is None:
        return {}
    body = await request.body()
    try:
        model = spec.body_model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        return _validation_error(exc)
    if spec.body_param is not None:
        return {spec.body_param: model}
    return {name: getattr(model, name) for name in type(model).model_fields}


def _validation_error(exc: ValidationError) -> JSONResponse:
    errors = [
        {"loc": ["body", *err["loc"]], "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_context=False, include_input=False)
    ]
    return JSONResponse({"detail": errors}, status_code=422)


def _to_response(result: object) -> Response:
    if isinstance(result, Response):
        return result  # e.g. a StreamingResponse: passed through unbuffered
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    return JSONResponse(to_jsonable_python(result))


def _websocket_handler(func: Callable[..., Any], spec: EndpointSpec) -> Callable[..., Any]:
    async def handle(websocket: WebSocket) -> None:
        try:
            await func(websocket)
        except Exception:
            _log.exception("websocket endpoint %s (%s) failed", spec.path, spec.attr)
            if websocket.application_state != WebSocketState.DISCONNECTED:
                await websocket.close(code=1011)

    return handle


async def _health(request: Request) -> Response:
    return JSONResponse({"version": __version__})


def _openapi_handler(target: type | FalFunction) -> Callable[..., Any]:
    cache: list[bytes] = []  # built on first request: a bad schema must not block startup

    async def handle(request: Request) -> Response:
        if not cache:
            cache.append(json.dumps(openapi_for(target)).encode())
        return Response(cache[0], media_type="application/json")

    return handle


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail: Any = exc.detail
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"Path {request.url.path} not found"
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)
