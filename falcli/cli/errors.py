"""The one place that turns exceptions into a message on stderr and an exit code.

| code | meaning                                                    | raised as                    |
|------|------------------------------------------------------------|------------------------------|
| 0    | ok                                                         |                              |
| 1    | user error: config, packaging, not found, rejected request | UserError, NotFoundError ... |
| 2    | usage: a bad flag or argument                              | typer's usage errors         |
| 3    | server/build/runner failure, service unreachable, a bug    | ServerError, ServiceUnavail. |
| 4    | auth: the key is missing, wrong or not allowed             | AuthError                    |
| 130  | interrupted (Ctrl-C)                                       | KeyboardInterrupt            |

typer (0.29+) carries its own copy of click, so its exceptions are matched through typer's
public names (``typer.Exit``, ``typer.Abort``, ``typer.TyperException``).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

import typer

from falcli.errors import (
    AuthError,
    ClientError,
    FalError,
    NotFoundError,
    ServerError,
    ServiceUnavailable,
    UserError,
)

__all__ = [
    "EXIT_AUTH",
    "EXIT_CODES_HELP",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "EXIT_USER",
    "exit_code_for",
    "report",
    "run_guarded",
]

EXIT_OK = 0
EXIT_USER = 1
EXIT_USAGE = 2
EXIT_FAILURE = 3
EXIT_AUTH = 4
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 user error (config, packaging, not found), 2 usage, "
    "3 server/build/runner failure or service unreachable, 4 auth, 130 interrupted."
)

# Most specific first: the first isinstance match wins.
_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (AuthError, EXIT_AUTH),
    (NotFoundError, EXIT_USER),
    (ServiceUnavailable, EXIT_FAILURE),
    (ServerError, EXIT_FAILURE),
    (ClientError, EXIT_USER),  # another 4xx: the request was wrong
    (UserError, EXIT_USER),
    (FalError, EXIT_FAILURE),  # InternalError
)


def exit_code_for(exc: BaseException) -> int:
    """The exit code for an exception that reached the top of a command."""
    if isinstance(exc, KeyboardInterrupt | typer.Abort):
        return EXIT_INTERRUPTED
    if isinstance(exc, typer.TyperException):
        return int(exc.exit_code)  # usage errors: 2
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return EXIT_FAILURE


def report(exc: BaseException) -> None:
    """Write one clear message (plus a build log / traceback when there is one) to stderr."""
    if isinstance(exc, typer.TyperException):
        show = getattr(exc, "show", None)
        if callable(show):
            show(file=sys.stderr)
        else:
            sys.stderr.write(f"Error: {exc.format_message()}\n")
        return
    if isinstance(exc, KeyboardInterrupt | typer.Abort):
        sys.stderr.write("Interrupted.\n")
        return
    detail = getattr(exc, "detail", "") if isinstance(exc, ServerError) else ""
    if detail:
        sys.stderr.write(detail.rstrip("\n") + "\n")
    if isinstance(exc, FalError):
        sys.stderr.write(f"Error: {exc}\n")
    else:
        if os.environ.get("FALCLI_DEBUG"):
            traceback.print_exception(exc, file=sys.stderr)
        sys.stderr.write(
            f"Error: internal error {type(exc).__name__}: {exc}\n"
            "This is a bug in falcli: rerun with FALCLI_DEBUG=1 for the traceback and report it.\n"
        )
    sys.stderr.flush()


def run_guarded(invoke: Callable[[], object]) -> int:
    """Call ``invoke`` (the click main in non-standalone mode) and map what escapes."""
    try:
        result = invoke()
    except typer.Exit as exc:
        return int(exc.exit_code)
    except (Exception, KeyboardInterrupt) as exc:
        report(exc)
        return exit_code_for(exc)
    return result if isinstance(result, int) else EXIT_OK
