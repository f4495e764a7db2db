"""The one error tree of falcli. The CLI maps each branch to an exit code.

    FalError
    ├── UserError                 exit 1: the user can fix it
    │   ├── ConfigError           pyproject / option / ref problems
    │   │   └── OptionError       a bad app option (also a ValueError)
    │   ├── PackagingError        collecting files, pickling, sdists
    │   └── AppInstantiationError an App instantiated outside a runner
    ├── ClientError               talking to the service
    │   ├── AuthError             401/403 (exit 4)
    │   ├── NotFoundError         404 (exit 1)
    │   ├── ServiceUnavailable    cannot reach / start the service (exit 3)
    │   └── ServerError           5xx, or a build / runner failure (exit 3)
    └── InternalError             a bug (exit 3)

Every message names what failed, the value, and the fix.
"""

from __future__ import annotations

__all__ = [
    "AppInstantiationError",
    "AuthError",
    "ClientError",
    "ConfigError",
    "FalError",
    "InternalError",
    "NotFoundError",
    "OptionError",
    "PackagingError",
    "ServerError",
    "ServiceUnavailable",
    "UserError",
]


class FalError(Exception):
    """Base of every error falcli raises on purpose."""


class UserError(FalError):
    pass


class ConfigError(UserError):
    pass


class OptionError(ConfigError, ValueError):
    pass


class PackagingError(UserError):
    pass


class AppInstantiationError(UserError, TypeError):
    pass


class ClientError(FalError):
    def __init__(self, message: str, *, status: int | None = None, error_type: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type


class AuthError(ClientError):
    pass


class NotFoundError(ClientError):
    pass


class ServiceUnavailable(ClientError):
    pass


class ServerError(ClientError):
    """A 5xx, a failed build, or a runner that failed; ``detail`` may hold a traceback."""

    def __init__(
        self, message: str, *, status: int | None = None, error_type: str = "", detail: str = ""
    ) -> None:
        super().__init__(message, status=status, error_type=error_type)
        self.detail = detail


class InternalError(FalError):
    pass
