"""The curated public surface of the SDK; ``import fal`` re-exports exactly this.

Kept light on purpose: nothing here imports starlette, pydantic or uvicorn, so ``import fal``
(in the user's code, in the CLI, on a runner) stays cheap. Serving lives in falcli.endpoints.
"""

from __future__ import annotations

from falcli import __version__
from falcli.app import App, endpoint
from falcli.function import ContainerImage, FalFunction, function

__all__ = ["App", "ContainerImage", "FalFunction", "__version__", "endpoint", "function"]
