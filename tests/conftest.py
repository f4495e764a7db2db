"""Shared fixtures: the real service in a subprocess, on 127.0.0.1 and a free port.

``service`` (one per test), ``module_service`` (one per test module, for read-mostly tests)
and ``service_factory`` (start services with extra flags, e.g. ``--emulate-gpus 2``). Each
yields a ``service_helpers.ServiceProcess`` (``.url``, ``.admin_key``, ``.data_dir``,
``.proc``, ``.stop()``, ``.client()``). Teardown stops the service with SIGTERM and checks
that it exited cleanly and that no runner process outlived it. The shared uv cache is kept
(UV_CACHE_DIR untouched) so env builds stay warm across tests.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from service_helpers import ServiceProcess, leftover_processes, wait_until

RUNNER_EXIT_TIMEOUT = 10.0


def _finish(svc: ServiceProcess) -> None:
    code = svc.stop()
    try:
        wait_until(lambda: not leftover_processes(svc.data_dir), RUNNER_EXIT_TIMEOUT, "runners")
    except AssertionError:
        pids = leftover_processes(svc.data_dir)
        raise AssertionError(f"runner processes outlived the service: {pids}") from None
    # uvicorn re-raises the signal once its graceful shutdown is done: -SIGTERM is clean
    assert code in (0, -signal.SIGTERM), f"service exited with {code}:\n{svc.log()[-4000:]}"


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    started: list[ServiceProcess] = []

    def start(*args: str, name: str = "data") -> ServiceProcess:
        svc = ServiceProcess(tmp_path / name, list(args)).start()
        started.append(svc)
        return svc

    yield start
    for svc in started:
        _finish(svc)


@pytest.fixture
def service(service_factory: Callable[..., ServiceProcess]) -> ServiceProcess:
    return service_factory()


@pytest.fixture(scope="module")
def module_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    svc = ServiceProcess(tmp_path_factory.mktemp("svc") / "data").start()
    yield svc
    _finish(svc)
