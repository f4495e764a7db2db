"""Packaging: collect files, cloudpickle the app, build sdists, hash it all into a Bundle.

``package(target)`` is the one entry point; ``falcli.packaging.manifest`` is the wire schema
it fills in (contract 1 of docs/architecture.md).
"""

from __future__ import annotations

from falcli.packaging.bundle import Bundle, package

__all__ = ["Bundle", "package"]
