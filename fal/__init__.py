"""``import fal``: the fal-compatible SDK (``fal.App``, ``fal.endpoint``, ``fal.function``).

A shim over falcli.sdk, so user code written for fal runs unchanged on this platform.
"""

from __future__ import annotations

from falcli.sdk import App, ContainerImage, FalFunction, __version__, endpoint, function

__all__ = ["App", "ContainerImage", "FalFunction", "__version__", "endpoint", "function"]
