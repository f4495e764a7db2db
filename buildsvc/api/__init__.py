"""The management API (contract 2 of docs/architecture.md): one router per noun.

``build_api()`` assembles them into a FastAPI app; ``buildsvc.app`` mounts it under ``/v1``
and hands it the service components through ``app.state.services``.
"""

from __future__ import annotations

from fastapi import FastAPI

from buildsvc import __version__
from buildsvc.api import apps, blobs, health, keys, runners
from buildsvc.api.deps import Services, install_error_handlers

__all__ = ["Services", "build_api"]


def build_api() -> FastAPI:
    api = FastAPI(
        title="fal self-hosted management API",
        version=__version__,
        docs_url="/v1/docs",
        redoc_url=None,
        openapi_url="/v1/openapi.json",
    )
    for module in (health, blobs, apps, runners, keys):
        api.include_router(module.router)
    install_error_handlers(api)
    return api
