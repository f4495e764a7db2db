"""The zygote: one pre-imported parent per environment that forks runners in milliseconds.

A runner's cold start is mostly imports (pydantic, starlette, asyncio, uvicorn, cloudpickle).
``python -m buildsvc.runtime.zygote`` runs inside an app's environment, imports all of that
once (never app code, and without starting a thread or an event loop, so forking is safe),
then waits on a Unix ``SOCK_SEQPACKET`` socket shared with the service. Wire format, one JSON
object per packet::

    zygote -> service   {"ready": true, "pid": N}                      once, after imports
    service -> zygote   {"op": "fork", "id": K, "runner_id", "workdir", "env"}
                        + SCM_RIGHTS: control write end, lifeline read end, stdout, stderr
    zygote -> service   {"id": K, "pid": P}  or  {"id": K, "error": "..."}
    zygote -> service   {"exited": P, "code": C}                       C < 0: killed by -C

The forked child starts a new session, takes the passed fds as its stdout/stderr, chdirs to
the workdir, replaces ``os.environ`` with exactly the spec's environment, resets signals,
re-seeds ``random`` and runs the agent's ``main()``: the agent unpickles the app there, in
the runner, as with a direct spawn. The socket is the zygote's lifeline: EOF (the service
died or closed it) ends the zygote; runners have their own lifelines and are not touched.

This module is the zygote process itself; the service's side of the socket is
``runtime.zygote_client`` (used by ``runtime.local``), which takes the wire constants from
here. Only the standard library is imported at module level: the service imports this module
too, and its pre-imports are the zygote's own choice, made in ``_preimport``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import select
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["FD_VAR", "PACKET"]

FD_VAR = "FAL_ZYGOTE_FD"  # the socket's fd number, in the zygote's environment
PACKET = 1 << 20  # largest request (the env travels in it); bigger ones spawn directly
_FORK_FDS = 4  # control write end, lifeline read end, stdout write end, stderr write end
_REQUEST_ID = re.compile(rb'\{"op": "fork", "id": (\d+)')
# Everything a runner imports before serving. Missing optional ones are skipped.
_PREIMPORTS = (
    "asyncio", "concurrent.futures.thread", "json", "random", "traceback", "cloudpickle",
    "uvloop", "httptools", "pydantic", "pydantic_core", "starlette.applications",
    "falcli.app", "falcli.endpoints", "falcli.serving", "buildsvc.runtime.agent", "uvicorn",
    "uvicorn.config",
    "uvicorn.server", "uvicorn.protocols.http.httptools_impl", "uvicorn.lifespan.off",
    "uvicorn.protocols.websockets.auto", "anyio._backends._asyncio", "anyio.lowlevel",
    "anyio.streams.memory", "anyio.streams.stapled", "anyio.streams.tls", "anyio.to_thread",
)  # fmt: skip


@dataclass
class _ChildStart:
    """What a freshly forked child needs to become a runner."""

    request: dict[str, Any]
    fds: list[int]


def _preimport() -> None:
    for name in _PREIMPORTS:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    with contextlib.suppress(Exception):  # a warm-up only: a failure costs speed, not service
        _warm_up()


def _warm_up() -> None:
    """Build (never serve) an ASGI app for a throwaway App: pydantic and uvicorn import lazily."""
    import uvicorn
    from pydantic import BaseModel

    import fal
    from falcli import endpoints
    from falcli.app import instantiate

    class _Input(BaseModel):
        text: str = ""

    def run(self: object, body: _Input) -> _Input:
        return body

    # Real objects, not this module's postponed strings: a local class is not resolvable.
    run.__annotations__ = {"body": _Input, "return": _Input}

    class _Warm(fal.App):
        warm = fal.endpoint("/")(run)

    endpoints.openapi_for(_Warm)
    asgi = endpoints.asgi_app_for(instantiate(_Warm))
    uvicorn.Config(asgi, loop="none", http="httptools", lifespan="off",
                   log_level="warning", access_log=False).load()


class _Server:
    """The zygote's loop: fork on request, reap children, report their exits."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def serve(self) -> _ChildStart | None:
        """Run until the service goes away (None), or return in a forked child."""
        signal.signal(signal.SIGCHLD, _ignore)
        signal.set_wakeup_fd(self._wake_w)
        self._send({"ready": True, "pid": os.getpid()})
        while True:
            readable, _, _ = select.select([self._sock.fileno(), self._wake_r], [], [])
            if self._wake_r in readable:
                os.read(self._wake_r, 512)
                self._reap()
            if self._sock.fileno() in readable:
                try:
                    msg, fds, flags, _ = socket.recv_fds(self._sock, PACKET, _FORK_FDS + 1)
                except ConnectionResetError:
                    return None
                if not msg:
                    return None
                child = self._on_request(msg, fds, flags)
                if child is not None:
                    return child

    def _on_request(self, msg: bytes, fds: list[int], flags: int) -> _ChildStart | None:
        request = _parse(msg) if not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) else None
        if request is not None and len(fds) == _FORK_FDS:
            return self._fork(request, fds)
        _close_all(fds)
        ident = _REQUEST_ID.match(msg)  # a cut-off request still starts with its id
        if ident is not None:
            self._send({"id": int(ident[1]), "error": f"expected {_FORK_FDS} fds and a "
                        f"whole request, got {len(fds)} fds and flags {flags:#x}"})
        return None

    def _fork(self, request: dict[str, Any], fds: list[int]) -> _ChildStart | None:
        sync_r, sync_w = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:  # e.g. EAGAIN: refuse this one, keep serving the others
            _close_all([sync_r, sync_w, *fds])
            self._send({"id": request["id"], "error": f"fork() failed: {exc}"})
            return None
        if pid == 0:
            os.setsid()
            os.close(sync_r)
            os.close(sync_w)  # EOF tells the zygote the new session exists
            self._leave()
            return _ChildStart(request, fds)
        os.close(sync_w)
        # Reply only once the child leads its own group: stop() signals the group at once.
        os.read(sync_r, 1)
        os.close(sync_r)
        _close_all(fds)
        self._send({"id": request["id"], "pid": pid})
        return None

    def _leave(self) -> None:
        """In the child: drop what is the zygote's, so app code cannot reach the service."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._send({"exited": pid, "code": os.waitstatus_to_exitcode(status)})

    def _send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the service is gone: EOF ends the loop next
            self._sock.send(json.dumps(message).encode())


def _parse(msg: bytes) -> dict[str, Any] | None:
    try:
        request = json.loads(msg)
    except ValueError:
        return None
    ok = (isinstance(request, dict) and isinstance(request.get("id"), int)
          and isinstance(request.get("workdir"), str) and isinstance(request.get("env"), dict))
    return request if ok else None


def _ignore(signum: int, frame: object) -> None:
    return None  # the wakeup fd does the work; a handler must exist for it to be written


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _become_runner(child: _ChildStart, startup_path0: str) -> None:
    """In the forked child: look exactly like ``python -m buildsvc.runtime.agent`` would."""
    control, lifeline, out, err = child.fds
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(out, 1)
    os.dup2(err, 2)
    _close_all([out, err])
    workdir = str(child.request["workdir"])
    os.chdir(workdir)
    env = {str(k): str(v) for k, v in dict(child.request["env"]).items()}
    env.update({"FAL_AGENT_CONTROL_FD": str(control), "FAL_AGENT_LIFELINE_FD": str(lifeline)})
    os.environ.clear()
    os.environ.update(env)
    if sys.path and sys.path[0] == startup_path0:
        sys.path[0] = workdir  # `-m` put the cwd first; a runner's cwd is its workdir
    importlib.invalidate_caches()
    import random

    random.seed()  # never share the zygote's random state between runners
    from buildsvc.runtime import agent

    sys.argv = [agent.__file__ or "agent"]


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))  # native threads too, not only Python's
    except OSError:
        import threading

        return threading.active_count()


def _zygote_main() -> int:
    try:
        fd = int(os.environ.pop(FD_VAR))
    except (KeyError, ValueError):
        sys.stderr.write(f"zygote: {FD_VAR} is missing or not an fd number; the zygote is "
                         "started by the service's local runtime backend, not by hand\n")
        return 2
    sock = socket.socket(fileno=fd)
    startup_path0 = sys.path[0] if sys.path else ""
    _preimport()
    threads = _thread_count()
    if threads != 1:
        sys.stderr.write(f"zygote: {threads} threads after the imports; forking is only safe "
                         "with one, so runners of this env are spawned directly\n")
        return 3
    child = _Server(sock).serve()
    if child is None:
        return 0
    _become_runner(child, startup_path0)
    from buildsvc.runtime import agent

    return agent.main()


if __name__ == "__main__":
    sys.exit(_zygote_main())
