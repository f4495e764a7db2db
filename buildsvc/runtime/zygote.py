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

The service side is :class:`Zygote` (used by ``runtime.local``). Only the standard library is
imported at module level: the service imports this module too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import importlib
import json
import os
import re
import select
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

__all__ = ["ForkedProcess", "Zygote", "ZygoteUnavailable"]

_FD_VAR = "FAL_ZYGOTE_FD"
_PACKET = 1 << 20  # largest request (the env travels in it); bigger ones spawn directly
_FORK_FDS = 4  # control write end, lifeline read end, stdout write end, stderr write end
_REPLY_TIMEOUT_S = 10.0
_CLOSE_TIMEOUT_S = 5.0
_STDERR_TAIL = 20
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


class ZygoteUnavailable(Exception):
    """The zygote cannot fork this runner (not started, dead, or refused): spawn directly.

    ``fatal`` is False when only this request was refused (e.g. its env is too large for one
    packet) and the zygote still serves others."""

    def __init__(self, message: str, fatal: bool = True) -> None:
        super().__init__(message)
        self.fatal = fatal


# ---------------------------------------------------------------- inside the environment


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
                    msg, fds, flags, _ = socket.recv_fds(self._sock, _PACKET, _FORK_FDS + 1)
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
        fd = int(os.environ.pop(_FD_VAR))
    except (KeyError, ValueError):
        sys.stderr.write(f"zygote: {_FD_VAR} is missing or not an fd number; the zygote is "
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


# ---------------------------------------------------------------- in the service


class ForkedProcess:
    """A runner forked by a zygote: its pid and, once the zygote reports it, its exit code."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def _set_exit(self, code: int) -> None:
        if not self._exited.done():
            self.returncode = code
            self._exited.set_result(code)


class Zygote(asyncio.SubprocessProtocol):
    """The service's handle on one environment's zygote process (and its protocol)."""

    def __init__(self, sock: socket.socket) -> None:
        self.pid = 0
        self.alive = True
        self._sock = sock
        self._transport: asyncio.SubprocessTransport | None = None
        self._ids = iter(range(1, sys.maxsize))
        loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[None] = loop.create_future()
        self._exited: asyncio.Future[None] = loop.create_future()
        self._replies: dict[int, asyncio.Future[ForkedProcess]] = {}
        self._children: dict[int, ForkedProcess] = {}
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL)
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def spawn(cls, python: Path, env: dict[str, str], cwd: Path,
                    ready_timeout: float = 30.0) -> Zygote:
        """Start ``python -m buildsvc.runtime.zygote``; return once it has imported everything."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _PACKET)
        zygote = cls(ours)
        try:
            await asyncio.get_running_loop().subprocess_exec(
                lambda: zygote, str(python), "-m", "buildsvc.runtime.zygote", cwd=cwd,
                env={**env, _FD_VAR: str(theirs.fileno())}, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                pass_fds=(theirs.fileno(),), start_new_session=True)
        except OSError as exc:
            zygote._lost(str(exc))
            raise ZygoteUnavailable(f"cannot execute {python}: {exc}") from exc
        finally:
            theirs.close()
        await zygote._wait_ready(ready_timeout)
        return zygote

    async def fork(self, runner_id: str, workdir: Path, env: dict[str, str],
                   fds: list[int]) -> ForkedProcess:
        """Fork a runner. The caller keeps (and closes) its copies of ``fds``."""
        if not self.alive:
            raise ZygoteUnavailable(f"the zygote (pid {self.pid}) has exited")
        ident = next(self._ids)
        request = {"op": "fork", "id": ident, "runner_id": runner_id,  # keys in this order
                   "workdir": str(workdir), "env": env}
        reply = asyncio.get_running_loop().create_future()
        self._replies[ident] = reply
        try:
            socket.send_fds(self._sock, [json.dumps(request).encode()], fds)
            return await asyncio.wait_for(asyncio.shield(reply), _REPLY_TIMEOUT_S)
        except TimeoutError as exc:
            raise ZygoteUnavailable(f"the zygote (pid {self.pid}) did not answer the fork "
                                    f"request for {runner_id} within {_REPLY_TIMEOUT_S:g} s"
                                    ) from exc
        except OSError as exc:
            # Too big or no buffer space: this request only. Anything else: the channel.
            fatal = exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS, errno.EAGAIN)
            raise ZygoteUnavailable(f"cannot send the fork request for {runner_id}: {exc}",
                                    fatal=fatal) from exc
        finally:
            self._replies.pop(ident, None)

    async def close(self) -> None:
        """Close the socket (the zygote exits on EOF); kill it if it lingers."""
        self._lost("closed by the service")
        if self._transport is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._exited), _CLOSE_TIMEOUT_S)
            except TimeoutError:
                self._transport.kill()
                await asyncio.shield(self._exited)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr_tail)

    # asyncio.SubprocessProtocol: the loop calls these.
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transport does not subclass asyncio's, but has the same methods.
        transport = cast(asyncio.SubprocessTransport, transport)
        self._transport = transport
        self.pid = transport.get_pid()
        self._tasks.append(asyncio.create_task(self._guard(transport)))

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        text = data.decode("utf-8", "replace")
        self._stderr_tail.extend(line for line in text.splitlines() if line)

    def process_exited(self) -> None:
        self._lost(f"the zygote exited; its stderr:\n{self.stderr_tail()}")
        if not self._exited.done():
            self._exited.set_result(None)

    async def _guard(self, transport: asyncio.SubprocessTransport) -> None:
        """Close the transport once the zygote exits, or while the loop can still do it:
        a backend dropped without ``close()`` has its tasks cancelled by ``asyncio.run``."""
        try:
            await asyncio.shield(self._exited)
        except asyncio.CancelledError:
            self._lost("the event loop is closing", kill_children=False)
            raise
        finally:
            transport.close()  # kills the zygote if it still runs

    async def _wait_ready(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._sock.setblocking(False)
        loop.add_reader(self._sock.fileno(), self._on_readable)
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except (TimeoutError, ZygoteUnavailable) as exc:
            await self.close()
            reason = f"was not ready within {timeout:g} s" if isinstance(
                exc, TimeoutError) else "exited while starting"
            raise ZygoteUnavailable(f"the zygote (pid {self.pid}) {reason}; its stderr:\n"
                                    f"{self.stderr_tail()}") from None
        except BaseException:
            await self.close()
            raise

    def _on_readable(self) -> None:
        while self.alive:
            try:
                data = self._sock.recv(_PACKET)
            except BlockingIOError:
                return
            except OSError as exc:
                data, reason = b"", repr(exc)
            else:
                reason = "the zygote closed its socket"
            if not data:
                self._lost(reason)
                return
            self._on_message(json.loads(data))

    def _on_message(self, message: dict[str, Any]) -> None:
        if message.get("ready"):
            if not self._ready.done():
                self._ready.set_result(None)
        elif "exited" in message:
            child = self._children.pop(int(message["exited"]), None)
            if child is not None:
                child._set_exit(int(message["code"]))
        elif "id" in message:
            self._on_reply(message)

    def _on_reply(self, message: dict[str, Any]) -> None:
        reply = self._replies.get(int(message["id"]))
        if "pid" in message:
            # Registered now, not when the caller resumes: its exit may be the next packet.
            child = self._children[int(message["pid"])] = ForkedProcess(int(message["pid"]))
            if reply is not None and not reply.done():
                reply.set_result(child)
        elif reply is not None and not reply.done():
            reply.set_exception(ZygoteUnavailable(str(message.get("error")), fatal=False))

    def _lost(self, reason: str, kill_children: bool = True) -> None:
        """The channel is gone: fail pending forks. Runners whose exit we can no longer
        learn are killed (exit code reported as SIGKILL) rather than left untracked."""
        if not self.alive:
            return
        self.alive = False
        with contextlib.suppress(ValueError, RuntimeError):
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        pending: list[asyncio.Future[Any]] = [self._ready, *self._replies.values()]
        for future in pending:
            if not future.done():
                future.set_exception(ZygoteUnavailable(reason))
                future.exception()  # retrieved: whoever awaits it re-raises
        if kill_children:
            self._tasks.extend(asyncio.create_task(_kill_orphan(c))
                               for c in self._children.values())
        self._children.clear()


async def _kill_orphan(child: ForkedProcess) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    try:
        pidfd = os.pidfd_open(child.pid)
    except OSError:
        child._set_exit(-signal.SIGKILL)
        return
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()
    loop.add_reader(pidfd, _settle, gone)
    try:
        await asyncio.wait_for(gone, _CLOSE_TIMEOUT_S)
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    child._set_exit(-signal.SIGKILL)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


if __name__ == "__main__":
    sys.exit(_zygote_main())
