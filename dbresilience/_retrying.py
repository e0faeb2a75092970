"""Retry construction shared by connect retries, transaction retries and commit checks.

All retries go through tenacity with exponential backoff and full jitter
(``wait_random_exponential``), an attempt cap and an overall deadline; the last wait is cut
so that it never sleeps past the deadline. Failures of kind ``unavailable`` (the server, or
PgBouncer in front of it, says it cannot serve: nothing ran) are bounded by the deadline
alone, as connect retries are: behind a pooler they come back at once, and an attempt cap
would give up on a restart that the deadline allows for. A failure carrying ``retry_after``
(an open circuit breaker, which paces its probes itself: the time to its next probe slot)
waits exactly that long instead of the backoff, or ends the loop at once when that wait
would reach the deadline. :func:`set_testing` removes the sleeps (and can cap attempts) for
users' test suites, like ``stamina.set_testing``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import tenacity

from dbresilience._classification import ErrorKind, classify
from dbresilience._observability import Stats

__all__ = ["is_testing", "retry_kwargs", "set_testing"]

_testing: bool = False
_testing_attempts: int | None = None


def set_testing(
    testing: bool, *, attempts: int | None = None
) -> contextlib.AbstractContextManager[None]:
    """Turn backoff sleeps off (``testing=True``) or on again, for tests of applications.

    :param attempts: when testing, cap every retry loop at this many attempts (``None``: keep
        the policy's value).

    Usable as a plain call or as a context manager that restores the previous state::

        with dbresilience.set_testing(True, attempts=2):
            ...
    """
    global _testing, _testing_attempts
    previous = (_testing, _testing_attempts)
    if attempts is not None and attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts!r}")
    _testing, _testing_attempts = testing, attempts if testing else None

    @contextlib.contextmanager
    def restore() -> Iterator[None]:
        global _testing, _testing_attempts
        try:
            yield
        finally:
            _testing, _testing_attempts = previous

    return restore()


def is_testing() -> bool:
    """True while :func:`set_testing` has turned sleeps off."""
    return _testing


class _Wait(tenacity.wait.wait_base):
    """Full-jitter exponential wait, or the failure's ``retry_after`` when it has one; never
    past the deadline. While testing the backoff is zero, but ``retry_after`` (an open
    breaker's next probe, at most ``connect_wait_max``) is still waited: else a test against a
    server that is down would spin a core until the deadline."""

    def __init__(self, initial: float, maximum: float, deadline: float) -> None:
        self._inner = tenacity.wait_random_exponential(multiplier=initial, max=maximum)
        self._deadline = deadline

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        asked = _retry_after(retry_state)
        if _testing and asked is None:
            return 0.0
        elapsed = retry_state.seconds_since_start or 0.0
        wait = self._inner(retry_state) if asked is None else asked
        return max(0.0, min(wait, self._deadline - elapsed))


def _failure(retry_state: tenacity.RetryCallState) -> BaseException | None:
    """The exception the last attempt raised, if it failed."""
    outcome = retry_state.outcome
    return outcome.exception() if outcome is not None and outcome.failed else None


def _retry_after(retry_state: tenacity.RetryCallState) -> float | None:
    """Seconds the failure asked us to wait (an open circuit breaker: until its next probe
    slot), or ``None`` when it did not say."""
    value = getattr(_failure(retry_state), "retry_after", None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return max(0.0, float(value))


class _AttemptStop(tenacity.stop.stop_base):
    """Stop after ``attempts`` attempts, unless the last one could not reach the server."""

    def __init__(self, attempts: int) -> None:
        self._attempts = attempts

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        if retry_state.attempt_number < self._attempts:
            return False
        exc = _failure(retry_state)
        return exc is None or classify(exc).kind is not ErrorKind.UNAVAILABLE


class _BreakerStop(tenacity.stop.stop_base):
    """Stop at once when the wait a failure asks for (``retry_after``) reaches the deadline:
    the circuit breaker will not let us through in time."""

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        asked = _retry_after(retry_state)
        if asked is None:
            return False  # the deadline stop handles it
        elapsed = retry_state.seconds_since_start or 0.0
        return elapsed + asked >= self._deadline


def retry_kwargs(
    what: str,
    *,
    attempts: int,
    deadline: float,
    wait_initial: float,
    wait_max: float,
    stats: Stats,
    retry_if: Callable[[BaseException], bool],
) -> dict[str, Any]:
    """Keyword arguments for ``tenacity.Retrying`` / ``AsyncRetrying`` (one config, both)."""
    attempt_stop: tenacity.stop.stop_base = _AttemptStop(attempts)
    if _testing and _testing_attempts is not None:  # a hard cap, whatever the failure
        attempt_stop = tenacity.stop_after_attempt(min(attempts, _testing_attempts))

    def before_sleep(state: tenacity.RetryCallState) -> None:
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None else None
        if exc is not None:
            wait = state.next_action.sleep if state.next_action is not None else 0.0
            stats.retry(what, state.attempt_number, wait, classify(exc))

    return {
        "stop": (
            attempt_stop
            | tenacity.stop_after_delay(deadline)
            | _BreakerStop(deadline)
        ),
        "wait": _Wait(wait_initial, wait_max, deadline),
        "retry": tenacity.retry_if_exception(retry_if),
        "before_sleep": before_sleep,
        "reraise": True,
    }
