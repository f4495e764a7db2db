"""The runner agent: runs INSIDE the app's environment as ``python -m buildsvc.runtime.agent``.

It unpickles the app (the only place user code is ever unpickled), runs ``setup()``, serves
the app over HTTP on a loopback port it binds itself, and reports its state to the service
as JSON lines on the control pipe (contract 3 of docs/architecture.md)::

    {"state": "SETUP"} -> {"state": "IDLE", "port": N} -> {"state": "DRAINING"}
    -> {"state": "TERMINATED"}        or at any point before IDLE: {"state": "FAILED", ...}

Inputs (environment): FAL_RUNNER_ID, FAL_AGENT_CONTROL_FD, FAL_AGENT_LIFELINE_FD (read end
of a pipe whose write end only the service holds: EOF means the service died, and the
runner kills its own process group so nothing is orphaned), FAL_PAYLOAD, FAL_PAYLOAD_PYTHON,
FAL_APP_KIND, FAL_MAX_MULTIPLEXING.

SIGTERM: stop accepting at once, ``handle_exit()`` immediately (once), let in-flight requests
finish, ``teardown()``, report TERMINATED, exit 0. The service SIGKILLs the group after the
grace period. Only the standard library is imported at module level: cold start matters.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import falcli

__all__ = ["main"]

_EXIT_FAILED = 1
_EXIT_BAD_INPUT = 2


@dataclass(frozen=True)
class _Inputs:
    runner_id: str
    control_fd: int
    lifeline_fd: int | None
    payload: str
    payload_python: str
    kind: str
    max_multiplexing: int

    @classmethod
    def from_environ(cls) -> _Inputs:
        env = os.environ
        lifeline = env.get("FAL_AGENT_LIFELINE_FD")
        return cls(
            runner_id=env.get("FAL_RUNNER_ID", "local"),
            control_fd=int(env["FAL_AGENT_CONTROL_FD"]),
            lifeline_fd=int(lifeline) if lifeline else None,
            payload=env["FAL_PAYLOAD"],
            payload_python=env.get("FAL_PAYLOAD_PYTHON", ""),
            kind=env.get("FAL_APP_KIND", "app"),
            max_multiplexing=int(env.get("FAL_MAX_MULTIPLEXING", "1")),
        )


class _Control:
    """The JSON-lines channel to the service. Writes are whole lines, so never interleaved."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def send(self, state: str, **fields: Any) -> None:
        data = (json.dumps({"state": state, **fields}) + "\n").encode()
        with contextlib.suppress(OSError):  # the service is gone: the lifeline handles that
            while data:  # a long traceback is more than one pipe buffer
                data = data[os.write(self._fd, data):]


def _watch_lifeline(fd: int | None) -> None:
    """Kill our whole process group when the service's end of the lifeline closes."""
    if fd is None:
        return

    def watch() -> None:
        while True:
            try:
                if not os.read(fd, 64):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        # Only a group leader (as the local backend starts us) may take its group down.
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="fal-lifeline", daemon=True).start()


def _python_mismatch(payload_python: str) -> str | None:
    own = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not payload_python or payload_python == own:
        return None
    return (f"FAL_PAYLOAD_PYTHON = {payload_python!r}: the app was pickled by Python "
            f"{payload_python} but this runner runs Python {own}, and pickled bytecode only "
            f"loads on the version that made it; deploy from Python {own}, or build the "
            f"environment with Python {payload_python}")


def _load_payload(path: str) -> Any:
    import cloudpickle

    with open(path, "rb") as f:
        return cloudpickle.load(f)


async def _prepare(inputs: _Inputs) -> tuple[Any, Any]:
    """Unpickle, instantiate and set up the app; return (ASGI app, App instance or None)."""
    obj = _load_payload(inputs.payload)
    from falcli import endpoints
    from falcli.app import call_hook, instantiate

    if inputs.kind == "function":
        await _run_setup_function(obj)
        return endpoints.asgi_app_for(obj), None
    instance = instantiate(obj)
    await call_hook(instance, "setup")
    return endpoints.asgi_app_for(instance), instance


async def _run_setup_function(function: Any) -> None:
    setup = getattr(function, "setup_function", None)
    if setup is None:
        return
    result = await asyncio.to_thread(setup)  # sync code must not block the loop
    if asyncio.iscoroutine(result):
        await result


# Frames of the agent, the SDK and the thread hop into a sync hook say nothing to the user.
_PLUMBING = tuple(
    f"{directory}/"
    for module_dir in (Path(__file__).parents[1], Path(falcli.__file__).parent,
                       Path(asyncio.__file__).parent, Path(concurrent.futures.__file__).parent)
    for directory in {module_dir, module_dir.resolve()}  # as imported (links) and as stored
)  # fmt: skip


def app_traceback(exc: BaseException) -> str:
    """``exc``'s traceback without our own frames: what the app's author needs to see."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_PLUMBING)]  # fmt: skip
    if not frames:  # the failure is ours (loading the payload, ...): show everything
        return "".join(traceback.format_exception(exc))
    lines = traceback.format_list(frames) + traceback.format_exception_only(type(exc), exc)
    return "Traceback (most recent call last):\n" + "".join(lines)


def _bind_loopback() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit it; without it a multi-part response on the plain asyncio
    # loop waits ~40 ms on Nagle + delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.set_inheritable(False)
    return sock


class _Agent:
    def __init__(self, inputs: _Inputs, control: _Control) -> None:
        self._inputs = inputs
        self._control = control
        self._instance: Any = None
        self._server: Any = None
        self._exit_hook: asyncio.Task[None] | None = None

    async def run(self) -> int:
        try:
            asgi, self._instance = await _prepare(self._inputs)
        except BaseException as exc:
            self._control.send("FAILED", error=app_traceback(exc))
            return _EXIT_FAILED
        sock = _bind_loopback()
        self._server = _make_server(asgi, on_started=lambda: self._on_started(sock))
        await self._server.serve(sockets=[sock])
        if self._exit_hook is None:
            self._control.send("FAILED", error="the HTTP server stopped without a SIGTERM")
            return _EXIT_FAILED
        await self._finish()
        return 0

    def _on_started(self, sock: socket.socket) -> None:
        os.environ["FAL_RUNNER_STATE"] = "RUNNING"
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_sigterm)
        self._control.send("IDLE", port=sock.getsockname()[1])

    def _on_sigterm(self) -> None:
        if self._exit_hook is not None:
            return  # handle_exit runs once, however many signals arrive
        os.environ["FAL_RUNNER_STATE"] = "TERMINATING"
        self._control.send("DRAINING")
        for listener in self._server.servers:
            listener.close()  # stop accepting now; uvicorn's own loop only looks every 100 ms
        self._server.should_exit = True
        self._exit_hook = asyncio.ensure_future(self._hook_logged("handle_exit"))

    async def _finish(self) -> None:
        assert self._exit_hook is not None
        await self._exit_hook
        await self._hook_logged("teardown")
        self._control.send("TERMINATED")

    async def _hook_logged(self, name: str) -> None:
        if self._instance is None:
            return
        from falcli.app import call_hook

        try:
            await call_hook(self._instance, name)
        except Exception:
            sys.stderr.write(f"{name}() raised:\n{traceback.format_exc()}")
            sys.stderr.flush()


def _make_server(asgi: Any, on_started: Callable[[], None]) -> Any:
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn without its signal handling (ours drains and runs the hooks)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                on_started()

    config = uvicorn.Config(asgi, loop="none", http="httptools", lifespan="off",
                            log_level="warning", access_log=False)
    return _Server(config)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> int:
    try:
        inputs = _Inputs.from_environ()
    except (KeyError, ValueError) as exc:
        sys.stderr.write(
            f"runner agent: bad or missing input {exc}: FAL_AGENT_CONTROL_FD and FAL_PAYLOAD "
            "must be set; the agent is started by the service's runtime backend, not by hand\n")
        return _EXIT_BAD_INPUT
    control = _Control(inputs.control_fd)
    _watch_lifeline(inputs.lifeline_fd)
    os.environ["FAL_RUNNER_STATE"] = "SETUP"
    control.send("SETUP")
    mismatch = _python_mismatch(inputs.payload_python)
    if mismatch:
        control.send("FAILED", error=mismatch)
        return _EXIT_BAD_INPUT
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_Agent(inputs, control).run())


if __name__ == "__main__":
    sys.exit(main())
