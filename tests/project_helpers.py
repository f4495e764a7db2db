"""What the tests that import user projects share (packaging, project config, scaffolding).

``isolated_imports`` is an autouse fixture: a test module applies it to every test by
importing it. The fixture projects share module names, so each test must import its own.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["isolated_imports"]


@pytest.fixture(autouse=True)
def isolated_imports() -> Iterator[None]:
    """User modules a test imports (fixtures share names) are forgotten after it; library
    modules imported lazily meanwhile stay, so class identities hold across tests."""
    path, modules = list(sys.path), set(sys.modules)
    yield
    sys.path[:] = path
    user_dirs = (str(Path(__file__).parent / "fixtures"), tempfile.gettempdir())
    for name in set(sys.modules) - modules:
        module = sys.modules[name]
        places = [getattr(module, "__file__", None) or "", *getattr(module, "__path__", [])]
        if any(str(p).startswith(user_dirs) for p in places):
            del sys.modules[name]
