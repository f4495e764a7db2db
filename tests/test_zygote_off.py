"""tests/test_runtime_local.py once more with the zygote turned off (FAL_NO_ZYGOTE=1).

The zygote is on by default, so that module tests forked runners; this one re-collects its
tests here and runs them against directly spawned runners, the fallback path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from runtime_helpers import app_env  # noqa: F401
from test_runtime_local import (  # noqa: F401
    test_missing_interpreter_is_a_start_error,
    test_payload_python_mismatch_is_refused_clearly,
    test_runner_past_grace_is_killed_with_its_children,
    test_runner_reaches_idle_answers_and_stops_cleanly,
    test_runner_sees_only_its_emulated_gpus,
    test_setup_raising_fails_start_with_the_traceback,
    test_sigterm_drains_in_flight_then_runs_hooks_once,
    test_startup_timeout_kills_the_runner,
)

from buildsvc.runtime import local


@pytest.fixture(autouse=True)
def _no_zygote(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("FAL_NO_ZYGOTE", "1")
    forked: list[object] = []
    real_fork = local.LocalBackend._fork

    async def record(self: local.LocalBackend, *args: object) -> object:
        forked.append(args)
        return await real_fork(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(local.LocalBackend, "_fork", record)
    yield
    assert not forked, "FAL_NO_ZYGOTE=1 must spawn every runner directly"
    assert os.environ["FAL_NO_ZYGOTE"] == "1"
