"""The retry decision (``buildsvc.queue.retry.decide``), as a table: one row per rule."""

from __future__ import annotations

import pytest

from buildsvc.queue.retry import MAX_ATTEMPTS, Attempt, Failure, Policy, decide

NONE = Policy()
SKIP_SERVER = Policy(skip_conditions=frozenset({"server_error"}))
SKIP_TIMEOUT = Policy(skip_conditions=frozenset({"timeout"}))
SKIP_CONNECT = Policy(skip_conditions=frozenset({"connection_error"}))
CALLER_NO = Policy(no_retry=True)

# (attempt, attempt number, policy) -> (retry, error_type, broken)
TABLE = [
    (Attempt(status=200), 1, NONE, False, None, False),
    (Attempt(status=201, needs_retry="1"), 1, NONE, False, None, False),
    (Attempt(status=404), 1, NONE, False, "http_error", False),
    (Attempt(status=422), 1, NONE, False, "http_error", False),
    (Attempt(status=500), 1, NONE, False, "internal_error", False),
    (Attempt(status=502), 1, NONE, False, "internal_error", False),
    (Attempt(status=503), 1, NONE, True, "runner_unavailable", True),
    (Attempt(status=504), 1, NONE, True, "request_timeout", True),
    (Attempt(failure=Failure.TIMEOUT), 1, NONE, True, "request_timeout", True),
    (Attempt(failure=Failure.DISCONNECT), 1, NONE, True, "runner_disconnected", True),
    (Attempt(failure=Failure.CONNECT), 1, NONE, True, "runner_disconnected", True),
    # at most MAX_ATTEMPTS attempts in all
    (Attempt(status=503), MAX_ATTEMPTS - 1, NONE, True, "runner_unavailable", True),
    (Attempt(status=503), MAX_ATTEMPTS, NONE, False, "runner_unavailable", True),
    (Attempt(failure=Failure.DISCONNECT), MAX_ATTEMPTS, NONE, False, "runner_disconnected", True),
    # skip_retry_conditions, each condition alone
    (Attempt(status=503), 1, SKIP_SERVER, False, "runner_unavailable", True),
    (Attempt(failure=Failure.DISCONNECT), 1, SKIP_SERVER, False, "runner_disconnected", True),
    (Attempt(failure=Failure.CONNECT), 1, SKIP_SERVER, True, "runner_disconnected", True),
    (Attempt(failure=Failure.CONNECT), 1, SKIP_CONNECT, False, "runner_disconnected", True),
    (Attempt(status=504), 1, SKIP_TIMEOUT, False, "request_timeout", True),
    (Attempt(failure=Failure.TIMEOUT), 1, SKIP_TIMEOUT, False, "request_timeout", True),
    (Attempt(status=503), 1, SKIP_TIMEOUT, True, "runner_unavailable", True),
    # the caller's X-Fal-No-Retry: 1 beats everything
    (Attempt(status=503), 1, CALLER_NO, False, "runner_unavailable", True),
    (Attempt(status=500, needs_retry="1"), 1, CALLER_NO, False, "internal_error", False),
    (Attempt(failure=Failure.DISCONNECT), 1, CALLER_NO, False, "runner_disconnected", True),
    # the runner's X-Fal-Needs-Retry overrides the status row and skip_retry_conditions
    (Attempt(status=503, needs_retry="0"), 1, NONE, False, "runner_unavailable", True),
    (Attempt(status=500, needs_retry="1"), 1, NONE, True, "internal_error", True),
    (Attempt(status=422, needs_retry="1"), 1, NONE, True, "http_error", True),
    (Attempt(status=503, needs_retry="1"), 1, SKIP_SERVER, True, "runner_unavailable", True),
    (Attempt(status=500, needs_retry="1"), MAX_ATTEMPTS, NONE, False, "internal_error", False),
    (Attempt(status=503, needs_retry="maybe"), 1, NONE, True, "runner_unavailable", True),
]


@pytest.mark.parametrize(("attempt", "number", "policy", "retry", "error_type", "broken"), TABLE)
def test_decide(
    attempt: Attempt, number: int, policy: Policy, retry: bool, error_type: str | None,
    broken: bool,
) -> None:  # fmt: skip
    decision = decide(attempt, number, policy)
    assert (decision.retry, decision.error_type, decision.broken) == (retry, error_type, broken)
    assert decision.reason


def test_reasons_name_the_rule_that_decided() -> None:
    assert "X-Fal-No-Retry" in decide(Attempt(status=503), 1, CALLER_NO).reason
    assert "X-Fal-Needs-Retry: 0" in decide(Attempt(status=503, needs_retry="0"), 1, NONE).reason
    assert "skip_retry_conditions" in decide(Attempt(status=503), 1, SKIP_SERVER).reason
    assert "10 attempts" in decide(Attempt(status=503), 10, NONE).reason
