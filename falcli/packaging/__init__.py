"""Packaging: collect files, cloudpickle the app, build sdists, hash it all into a Bundle.

``package(target)`` is the one entry point; ``falcli.packaging.manifest`` is the wire schema
it fills in (contract 1 of docs/architecture.md).

The names are resolved lazily: runners import ``falcli.packaging.pickling`` while unpickling
an app, and must not pull in project config (tomlkit) or ``build``, which their environment
does not have.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from falcli.packaging.bundle import Bundle, package

__all__ = ["Bundle", "package"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from falcli.packaging import bundle

        return getattr(bundle, name)
    raise AttributeError(f"module 'falcli.packaging' has no attribute {name!r}")
