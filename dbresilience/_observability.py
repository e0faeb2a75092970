"""Observability: the ``dbresilience`` logger, per-engine counters, and event dispatch.

Every :mod:`event <dbresilience._events>` of an engine goes through :meth:`Stats.emit`, which

1. counts it under stable string keys (the raw counters behind
   :func:`~dbresilience.get_stats`): ``retry.<what>``, ``retry.<what>.<kind>``,
   ``connect.failed``, ``disconnect``, ``invalidated.connection``, ``invalidated.pool``,
   ``replay.statement``, ``commit.<outcome>``, ``breaker.<new state>`` (``breaker.opened`` for
   ``open``), ``hang.aborted.<reason>``, ``watchdog.fired``; more keys are counted directly with
   :meth:`Stats.incr` (``error.<kind>``, ``dead.replaced``, ``pool.timeouts``...);
2. logs one line on the ``dbresilience`` logger, with the cause and the SQLSTATE (never a
   password: engine names are masked URLs; never statement parameters);
3. calls the hooks registered for every engine and those of this engine.

Counters are only touched on failure paths, never on the happy path.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from dbresilience._classification import Classification
from dbresilience._events import (
    BreakerTransition,
    CommitResolved,
    ConnectFailure,
    Disconnect,
    Event,
    EventHook,
    HangAbort,
    Invalidation,
    Replay,
    RetryDetails,
    StatementTimedOut,
)

__all__ = [
    "RetryHook",
    "Stats",
    "add_event_hook",
    "add_hook",
    "logger",
    "remove_event_hook",
    "remove_hook",
]

logger = logging.getLogger("dbresilience")


class RetryHook(Protocol):
    """Called synchronously before each retry; must be quick and must not raise."""

    def __call__(self, details: RetryDetails) -> None: ...


_retry_hooks: list[RetryHook] = []
_event_hooks: list[EventHook] = []


def add_hook(hook: RetryHook) -> None:
    """Register ``hook`` for every retry of every resilient engine (retries only: for every
    event, use :func:`add_event_hook`)."""
    _retry_hooks.append(hook)


def remove_hook(hook: RetryHook) -> None:
    """Unregister a hook added with :func:`add_hook`."""
    _retry_hooks.remove(hook)


def add_event_hook(hook: EventHook, *, engine: object = None) -> None:
    """Register ``hook`` for every event of ``engine`` (an ``Engine`` or ``AsyncEngine``), or
    of every resilient engine when ``engine`` is None."""
    if engine is None:
        _event_hooks.append(hook)
    else:
        _stats_of(engine).hooks.append(hook)


def remove_event_hook(hook: EventHook, *, engine: object = None) -> None:
    """Unregister a hook added with :func:`add_event_hook` (same ``engine``)."""
    if engine is None:
        _event_hooks.remove(hook)
    else:
        _stats_of(engine).hooks.remove(hook)


def _stats_of(engine: object) -> Stats:
    from dbresilience._engine_hooks import resilience_of  # the registry imports this module

    return resilience_of(engine).stats  # type: ignore[arg-type]


# Reconnecting and replaying a statement are routine, invisible recoveries (INFO); a whole
# transaction or a commit check running again is worth a WARNING.
_RETRY_LEVELS = {"connect": logging.INFO, "statement": logging.INFO}


def _cause(found: Classification) -> str:
    return f"cause={found.kind.value} sqlstate={found.sqlstate} reason={found.reason}"


def _describe(event: Event) -> tuple[tuple[str, ...], int, str]:
    """Counter keys, log level and log text of one event."""
    if isinstance(event, RetryDetails):
        found = event.classification
        return (
            (f"retry.{event.what}", f"retry.{event.what}.{found.kind.value}"),
            _RETRY_LEVELS.get(event.what, logging.WARNING),
            f"retrying {event.what}: attempt={event.attempt} wait={event.wait:.3f}s "
            f"{_cause(found)}",
        )
    if isinstance(event, ConnectFailure):
        found = event.classification
        return (("connect.failed",), logging.INFO, f"connect failed: {_cause(found)}")
    if isinstance(event, Disconnect):
        found = event.classification
        return (("disconnect",), logging.INFO, f"connection lost: {_cause(found)}")
    if isinstance(event, Invalidation):
        return (
            (f"invalidated.{event.scope}",),
            logging.INFO,
            f"invalidated {'the pool' if event.scope == 'pool' else 'a connection'}: "
            f"reason={event.reason}",
        )
    if isinstance(event, Replay):
        return (
            ("replay.statement",),
            logging.INFO,
            f"first statement replayed on a new connection: {_cause(event.classification)}",
        )
    if isinstance(event, CommitResolved):
        level = logging.ERROR if event.outcome == "unknown" else logging.WARNING
        return ((f"commit.{event.outcome}",), level, f"lost COMMIT resolved: {event.outcome}")
    if isinstance(event, BreakerTransition):
        key = "breaker.opened" if event.new == "open" else f"breaker.{event.new}"
        level = logging.WARNING if event.new == "open" else logging.INFO
        return ((key,), level, f"circuit breaker {event.old} -> {event.new}")
    if isinstance(event, HangAbort):
        return (
            (f"hang.aborted.{event.reason}",),
            logging.WARNING,
            f"hang monitor aborted a call: reason={event.reason}",
        )
    if isinstance(event, StatementTimedOut):
        return (("watchdog.fired",), logging.WARNING, "statement cut off at its deadline")
    raise TypeError(f"not a dbresilience event: {event!r}")  # pragma: no cover


class Stats:
    """Thread-safe counters and event hooks of one resilient engine.

    :ivar engine_name: the engine's URL, password masked.
    :ivar hooks: the :class:`~dbresilience.EventHook` s registered for this engine only.
    """

    def __init__(self, engine_name: str) -> None:
        self.engine_name = engine_name
        self.hooks: list[EventHook] = []
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

    def emit(self, event: Event, *, counted: bool = False) -> None:
        """Count, log and announce ``event`` (its ``engine`` must be this engine's name);
        ``counted``: already counted (with :meth:`count`), only log and announce it."""
        keys, level, text = _describe(event)
        if not counted:
            with self._lock:
                for key in keys:
                    self._counts[key] += 1
        logger.log(level, "%s engine=%s", text, self.engine_name)
        if isinstance(event, RetryDetails) and _retry_hooks:
            _call(_retry_hooks, event, "retry")
        if _event_hooks:
            _call(_event_hooks, event, "event")
        if self.hooks:
            _call(self.hooks, event, "event")

    def count(self, event: Event) -> None:
        """Count ``event`` now; :meth:`emit` it later with ``counted=True``."""
        keys = _describe(event)[0]
        with self._lock:
            for key in keys:
                self._counts[key] += 1

    def retry(self, what: str, attempt: int, wait: float, classification: Classification) -> None:
        """Count, log and announce one retry."""
        self.emit(RetryDetails(what, attempt, wait, classification, self.engine_name))


def _call(hooks: Sequence[Callable[[Any], None]], event: Event, kind: str) -> None:
    for hook in list(hooks):
        try:
            hook(event)
        except Exception:  # a broken hook must not break the app's query
            logger.exception("dbresilience %s hook %r failed", kind, hook)
