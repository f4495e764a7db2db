"""The service's side of a zygote (``runtime.zygote``): start it, ask it to fork, track exits.

:class:`Zygote` starts ``python -m buildsvc.runtime.zygote`` in an app's environment and
speaks the wire format described there over the ``SOCK_SEQPACKET`` socket; each runner it
forks is a :class:`ForkedProcess` whose exit code arrives from the zygote (it is the parent).
Any failure is a :class:`ZygoteUnavailable`: ``runtime.local`` then spawns the runner
directly, so a zygote only ever makes starts faster, never fails them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, cast

from buildsvc.runtime.zygote import FD_VAR, PACKET

__all__ = ["ForkedProcess", "Zygote", "ZygoteUnavailable"]

_REPLY_TIMEOUT_S = 10.0
_CLOSE_TIMEOUT_S = 5.0
_STDERR_TAIL = 20


class ZygoteUnavailable(Exception):
    """The zygote cannot fork this runner (not started, dead, or refused): spawn directly.

    ``fatal`` is False when only this request was refused (e.g. its env is too large for one
    packet) and the zygote still serves others."""

    def __init__(self, message: str, fatal: bool = True) -> None:
        super().__init__(message)
        self.fatal = fatal



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
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PACKET)
        zygote = cls(ours)
        try:
            await asyncio.get_running_loop().subprocess_exec(
                lambda: zygote, str(python), "-m", "buildsvc.runtime.zygote", cwd=cwd,
                env={**env, FD_VAR: str(theirs.fileno())}, stdin=asyncio.subprocess.DEVNULL,
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
                data = self._sock.recv(PACKET)
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
