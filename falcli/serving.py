"""The runner's ASGI app for an App instance or a FalFunction (contract 4).

Plain Starlette (FastAPI costs ~200 ms of cold start) speaking fal's runner shapes: POST
endpoints, ``GET /health``, ``GET /openapi.json``, 404 ``{"detail": "Path /x not found"}``,
pydantic-style 422s and 500 ``{"detail": ...}`` with the traceback in the logs. Only runners
import it; packaging needs just ``falcli.endpoints`` (specs and OpenAPI, no starlette).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketState

from falcli import __version__
from falcli.endpoints import EndpointSpec, endpoint_specs, openapi_for
from falcli.errors import ConfigError
from falcli.function import FalFunction

__all__ = ["asgi_app_for"]

_log = logging.getLogger("falcli.endpoints")
_MAX_DETAIL = 2000


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
