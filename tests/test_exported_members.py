"""The curated public surface: ``fal.__all__`` and ``falcli.sdk.__all__`` are listed here, so
adding or removing a public name is a deliberate, reviewed change."""

from __future__ import annotations

import subprocess
import sys

import fal
import falcli.sdk

EXPECTED = ["App", "ContainerImage", "FalFunction", "__version__", "endpoint", "function"]


def test_fal_exports() -> None:
    assert sorted(fal.__all__) == EXPECTED
    for name in fal.__all__:
        assert getattr(fal, name) is getattr(falcli.sdk, name)


def test_sdk_exports() -> None:
    assert sorted(falcli.sdk.__all__) == EXPECTED
    for name in falcli.sdk.__all__:
        assert hasattr(falcli.sdk, name)


def test_import_fal_stays_light() -> None:
    # Runners and the CLI import fal at cold start: no web stack, no rich.
    heavy = ["pydantic", "starlette", "uvicorn", "fastapi", "httpx", "rich", "asyncio"]
    code = f"import sys, fal; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
