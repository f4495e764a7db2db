"""The retry decision for one finished attempt of a queued request: a pure function.

The table it implements (wire-protocol.md, "What a runner returns"):

    outcome                              condition         error_type            retried
    2xx / 3xx                            -                 -                     no
    4xx, 500, 502 (and other 5xx)        -                 runner's, else below  no
    503                                  server_error      runner_unavailable    yes
    504, or request_timeout exceeded     timeout           request_timeout       yes
    connection broken / runner died      server_error      runner_disconnected   yes
    could not connect to the runner      connection_error  runner_disconnected   yes

Then, in order: the caller's ``X-Fal-No-Retry: 1`` stops any retry; the runner's
``X-Fal-Needs-Retry: 1`` / ``0`` forces or stops one for that response; a condition listed in
the app's ``skip_retry_conditions`` stops one; and no request gets more than ``max_attempts``
attempts in all. Sync calls never come here: they are never retried.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["MAX_ATTEMPTS", "Attempt", "Decision", "Failure", "Policy", "classify", "decide"]

MAX_ATTEMPTS = 10


class Failure(StrEnum):
    """An attempt that got no complete HTTP answer from the runner."""

    CONNECT = "connect"  # the runner refused or never accepted the connection
    DISCONNECT = "disconnect"  # the connection broke: the runner died or hung up
    TIMEOUT = "timeout"  # no answer within the app's request_timeout


@dataclass(frozen=True)
class Attempt:
    """What one attempt produced: an HTTP status, or a failure."""

    status: int | None = None
    failure: Failure | None = None
    needs_retry: str | None = None  # the runner's X-Fal-Needs-Retry header, verbatim


@dataclass(frozen=True)
class Policy:
    skip_conditions: frozenset[str] = frozenset()  # the app's skip_retry_conditions
    no_retry: bool = False  # the caller sent X-Fal-No-Retry: 1
    max_attempts: int = MAX_ATTEMPTS


@dataclass(frozen=True)
class Decision:
    retry: bool
    condition: str | None  # server_error | timeout | connection_error | None
    error_type: str | None  # the kind a terminal failure carries; None on success
    broken: bool  # the runner must be replaced (its lease released with broken=True)
    reason: str  # why, for the request's log


_FAILURES = {
    Failure.CONNECT: ("connection_error", "runner_disconnected"),
    Failure.DISCONNECT: ("server_error", "runner_disconnected"),
    Failure.TIMEOUT: ("timeout", "request_timeout"),
}
_STATUSES = {503: ("server_error", "runner_unavailable"), 504: ("timeout", "request_timeout")}


def classify(attempt: Attempt) -> tuple[str | None, str | None]:
    """(retry condition, error_type) of an attempt; (None, None) for a success."""
    if attempt.failure is not None:
        return _FAILURES[attempt.failure]
    status = attempt.status or 0
    if status in _STATUSES:
        return _STATUSES[status]
    if status >= 500:
        return None, "internal_error"
    if status >= 400:
        return None, "http_error"
    return None, None


def decide(attempt: Attempt, number: int, policy: Policy) -> Decision:
    """Retry attempt ``number`` (1-based) or end the request? See the module docstring."""
    condition, error_type = classify(attempt)
    broken = condition is not None
    if error_type is None:
        return Decision(False, None, None, False, "succeeded")
    wanted, reason = _wanted(attempt, condition, policy)
    if wanted and number >= policy.max_attempts:
        wanted, reason = False, f"gave up after {number} attempts ({condition or error_type})"
    return Decision(wanted, condition, error_type, broken or wanted, reason)


def _wanted(attempt: Attempt, condition: str | None, policy: Policy) -> tuple[bool, str]:
    if policy.no_retry:
        return False, "the caller sent X-Fal-No-Retry: 1"
    if attempt.needs_retry in ("0", "1"):
        value = attempt.needs_retry
        return value == "1", f"the runner sent X-Fal-Needs-Retry: {value}"
    if condition is None:
        return False, f"status {attempt.status} is not retried"
    if condition in policy.skip_conditions:
        return False, f"the app skips retries on {condition} (skip_retry_conditions)"
    return True, f"retrying on {condition}"
