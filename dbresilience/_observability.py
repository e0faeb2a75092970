"""Observability: the ``dbresilience`` logger, per-engine counters and instrumentation hooks.

Every retry, replay and recovery is logged as one line on the ``dbresilience`` logger
(``connect`` and ``statement`` retries at INFO, ``transaction`` and ``commit-check`` retries at
WARNING) and counted in the engine's :class:`Stats`. Applications may add hooks (any callable
taking a :class:`RetryDetails`) with :func:`add_hook`, e.g. to feed Prometheus or OpenTelemetry.
Counters are only touched on failure paths, never on the happy path.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from dbresilience._classification import Classification

__all__ = ["RetryDetails", "RetryHook", "Stats", "add_hook", "logger", "remove_hook"]

logger = logging.getLogger("dbresilience")


@dataclass(frozen=True, slots=True)
class RetryDetails:
    """One retry (or recovery) about to happen.

    :ivar what: what is retried: ``"connect"``, ``"statement"`` (first-statement replay),
        ``"transaction"`` or ``"commit-check"``.
    :ivar attempt: the attempt that just failed, starting at 1.
    :ivar wait: seconds we sleep before the next attempt.
    :ivar classification: why the attempt failed.
    :ivar engine: a secret-free name of the engine (URL with the password masked).
    """

    what: str
    attempt: int
    wait: float
    classification: Classification
    engine: str


class RetryHook(Protocol):
    """Called synchronously before each retry; must be quick and must not raise."""

    def __call__(self, details: RetryDetails) -> None: ...


_hooks: list[RetryHook] = []

# Reconnecting and replaying a statement are routine, invisible recoveries (INFO); a whole
# transaction or a commit check running again is worth a WARNING.
_LEVELS = {"connect": logging.INFO, "statement": logging.INFO}


def add_hook(hook: RetryHook) -> None:
    """Register ``hook`` for every retry of every resilient engine."""
    _hooks.append(hook)


def remove_hook(hook: RetryHook) -> None:
    """Unregister a hook added with :func:`add_hook`."""
    _hooks.remove(hook)


class Stats:
    """Thread-safe counters of what one resilient engine did.

    Keys are stable strings: ``retry.<what>`` and ``retry.<what>.<kind>`` (what: connect,
    statement, transaction, commit-check), ``replay.statement``, ``dead.replaced``,
    ``error.<kind>`` (errors seen by ``handle_error``), ``commit.<outcome>`` (committed, aborted,
    read-only, unknown: commits whose reply was lost), ``rollback.on_dead_connection``.
    """

    def __init__(self, engine_name: str) -> None:
        self.engine_name = engine_name
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def reset_lock(self) -> None:
        """A new lock, in a child after ``fork()`` (the parent's may have been held)."""
        self._lock = threading.Lock()

    def incr(self, key: str, n: int = 1) -> None:
        """Add ``n`` to counter ``key``."""
        with self._lock:
            self._counts[key] += n

    def snapshot(self) -> dict[str, int]:
        """A copy of all counters."""
        with self._lock:
            return dict(self._counts)

    def __getitem__(self, key: str) -> int:
        with self._lock:
            return self._counts[key]

    def __repr__(self) -> str:
        return f"Stats({self.engine_name!r}, {self.snapshot()!r})"

    def retry(self, what: str, attempt: int, wait: float, classification: Classification) -> None:
        """Count, log and announce one retry."""
        self.incr(f"retry.{what}")
        self.incr(f"retry.{what}.{classification.kind.value}")
        logger.log(
            _LEVELS.get(what, logging.WARNING),
            "retrying %s: attempt=%d wait=%.3fs cause=%s sqlstate=%s reason=%s engine=%s",
            what,
            attempt,
            wait,
            classification.kind.value,
            classification.sqlstate,
            classification.reason,
            self.engine_name,
        )
        if _hooks:
            details = RetryDetails(what, attempt, wait, classification, self.engine_name)
            for hook in list(_hooks):
                try:
                    hook(details)
                except Exception:  # a broken hook must not break the app's query
                    logger.exception("dbresilience retry hook %r failed", hook)
