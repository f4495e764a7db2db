"""The *agent layer* every app environment gets, whatever builds it (uv env or image).

A runner runs our agent (``python -m buildsvc.runtime.agent``) inside the app's environment,
so that environment needs the agent's own dependencies, pinned to the versions this service
runs, and our packages (``fal``, ``falcli``, ``buildsvc``). Both builders read them here, so
the env and the image of an app never disagree on them.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
from collections.abc import Iterable
from pathlib import Path

__all__ = ["AGENT_DISTS", "AGENT_PACKAGES", "agent_pins", "package_dirs"]

# Distributions the runner agent itself imports (falcli.app / falcli.endpoints / the agent).
# websockets: uvicorn needs it to accept upgrades for `@fal.endpoint(..., is_websocket=True)`.
AGENT_DISTS = ("cloudpickle", "pydantic", "starlette", "uvicorn", "uvloop", "httptools",
               "websockets")
AGENT_PACKAGES = ("fal", "falcli", "buildsvc")


def agent_pins(dists: Iterable[str] = AGENT_DISTS) -> list[str]:
    """``name==version`` for each of ``dists`` installed in this service (others skipped)."""
    pins = []
    for dist in dists:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            pins.append(f"{dist}=={importlib.metadata.version(dist)}")
    return pins


def package_dirs() -> dict[str, Path]:
    """Where our importable packages live in this service (editable or installed)."""
    dirs = {}
    for name in AGENT_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            dirs[name] = Path(next(iter(spec.submodule_search_locations))).resolve()
    return dirs
