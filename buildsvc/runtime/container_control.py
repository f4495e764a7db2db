"""The runner agent's control channel across a container boundary, both ends of it.

A local runner gets two inherited fds (contract 3): the control pipe and the lifeline. File
descriptors cannot cross into a container, so the Docker backend bind-mounts a per-runner
directory holding two FIFOs of the same meaning, and the container's command is
``python -m buildsvc.runtime.container_control``, which opens them, sets
``FAL_AGENT_CONTROL_FD`` / ``FAL_AGENT_LIFELINE_FD`` and runs the unchanged agent in-process
(``agent.main()``): same states, same SIGTERM lifecycle, no change to agent.py.

With ``FAL_EXPOSED_PORT`` set (``@fal.function(exposed_port=N)``, direct server mode) it runs
the user's server instead (``FAL_EXPOSED_CMD``, a JSON argv, or the pickled function, which
is expected to serve on that port) and reports IDLE with port N once it accepts connections.

Host side: ``ControlFifos`` makes the directory and holds the ends the service needs (the
control FIFO's read end, plus a writer so it never reads EOF before the container opens it;
the lifeline's writer, whose closing - the service dying - tells the runner to exit).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

__all__ = ["CONTAINER_DIR", "ControlFifos", "main"]

CONTAINER_DIR = "/run/fal"  # where the runner's FIFO directory is mounted
_CONTROL, _LIFELINE = "control", "lifeline"
_PORT_POLL_S = 0.02


class ControlFifos:
    """A runner's FIFO directory on the host; ``close()`` releases every fd we hold."""

    def __init__(self, directory: Path, uid: int) -> None:
        self.directory = Path(directory)
        self._fds: list[int] = []
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in (_CONTROL, _LIFELINE):
            path = self.directory / name
            path.unlink(missing_ok=True)
            os.mkfifo(path, 0o600)
        _give_to(self.directory, uid)

    def open_control(self) -> int:
        """The control FIFO's read end (non-blocking), for ``loop.connect_read_pipe``."""
        read_end = os.open(self.directory / _CONTROL, os.O_RDONLY | os.O_NONBLOCK)
        # Our own writer: until the container opens its end, a read would see EOF.
        self._fds.append(os.open(self.directory / _CONTROL, os.O_WRONLY | os.O_NONBLOCK))
        return read_end

    def hold_lifeline(self) -> None:
        # O_RDWR never blocks on a FIFO; only this process holds a writer.
        self._fds.append(os.open(self.directory / _LIFELINE, os.O_RDWR | os.O_NONBLOCK))

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


def _give_to(directory: Path, uid: int) -> None:
    """Let the container's uid use the FIFOs: by ownership, or by mode when we are not root."""
    try:
        for path in (directory, directory / _CONTROL, directory / _LIFELINE):
            os.chown(path, uid, uid)
    except PermissionError:
        os.chmod(directory, 0o711)
        os.chmod(directory / _CONTROL, 0o622)
        os.chmod(directory / _LIFELINE, 0o644)


# -- inside the container -----------------------------------------------------------------


def _send(fd: int, state: str, **fields: Any) -> None:
    data = (json.dumps({"state": state, **fields}) + "\n").encode()
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(fd, data):]


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def _start_server() -> tuple[threading.Thread | None, subprocess.Popen[bytes] | None]:
    """The user's server: a command of the image, or the pickled function run in a thread."""
    argv = json.loads(os.environ.get("FAL_EXPOSED_CMD") or "null")
    if argv:
        return None, subprocess.Popen(argv if isinstance(argv, list) else ["sh", "-c", argv])
    import cloudpickle

    with open(os.environ["FAL_PAYLOAD"], "rb") as f:
        function = cloudpickle.load(f)
    setup = getattr(function, "setup_function", None)
    if setup is not None:
        setup()
    thread = threading.Thread(target=function, name="fal-exposed-server", daemon=True)
    thread.start()
    return thread, None


def _watch_lifeline(fd: int) -> None:
    """EOF on the lifeline: the service died, so this runner goes too (as the agent does)."""

    def watch() -> None:
        while True:
            with contextlib.suppress(InterruptedError):
                if not os.read(fd, 64):
                    break
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="fal-lifeline", daemon=True).start()


def _serve_exposed(control: int, port: int) -> int:
    _send(control, "SETUP")
    try:
        thread, proc = _start_server()
    except BaseException:
        _send(control, "FAILED", error=traceback.format_exc())
        return 1
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    while not _port_open(port):
        if (thread and not thread.is_alive()) or (proc and proc.poll() is not None):
            _send(control, "FAILED", error=f"the server exited before it listened on port "
                  f"{port}; make it serve on exposed_port = {port} (host 127.0.0.1)")
            return 1
        time.sleep(_PORT_POLL_S)
    _send(control, "IDLE", port=port)
    while not stopping.wait(0.2):
        if (thread and not thread.is_alive()) or (proc and proc.poll() is not None):
            return 1  # the server died on its own: the backend reports the exit
    _send(control, "DRAINING")
    if proc is not None:
        proc.terminate()
        proc.wait()
    _send(control, "TERMINATED")
    return 0


def main() -> int:
    directory = Path(os.environ.get("FAL_CONTROL_DIR", CONTAINER_DIR))
    # The service opened its ends first, so neither open blocks.
    control = os.open(directory / _CONTROL, os.O_WRONLY)
    lifeline = os.open(directory / _LIFELINE, os.O_RDONLY)
    os.environ["FAL_AGENT_CONTROL_FD"] = str(control)
    os.environ["FAL_AGENT_LIFELINE_FD"] = str(lifeline)
    exposed = os.environ.get("FAL_EXPOSED_PORT")
    if exposed:
        _watch_lifeline(lifeline)
        return _serve_exposed(control, int(exposed))
    from buildsvc.runtime import agent

    return agent.main()


if __name__ == "__main__":
    sys.exit(main())
