"""One engine's resilience state, and the watchdog-bounded calls every hook uses."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import time
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.util import await_only

from dbresilience._circuit_breaker import CircuitBreaker
from dbresilience._drivers import Driver, driver_for
from dbresilience._events import HangAbort, StatementTimedOut
from dbresilience._observability import Stats, logger
from dbresilience._policy import Policy
from dbresilience._redaction import mask_url
from dbresilience._watchdog import watchdog

__all__ = [
    "CUT_OFF",
    "CUT_REASON",
    "DURING_COMMIT",
    "FROM_DRIVER",
    "NO_DEADLINE",
    "EngineResilience",
    "during_commit",
    "statement_deadline",
]

NO_DEADLINE = 1e9  # seconds: "armed for the hang monitor only"

#: Monotonic time by which the current ``run_transaction`` must be done (None outside one):
#: a statement already running is cut off then too, not only at ``command_timeout``.
statement_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "dbresilience_statement_deadline", default=None
)

# Marks set on an exception by the hook that saw it come out of the driver, read by the
# handle_error hook (which sees the application's own exceptions too, e.g. from a
# TypeDecorator or a before_cursor_execute listener: those are left alone).
FROM_DRIVER = "_dbresilience_from_driver"  # raised by a driver call
CUT_OFF = "_dbresilience_cut_off"  # the Position of a statement the watchdog cut off
CUT_REASON = "_dbresilience_cut_reason"  # why: "deadline", "dead-link", "host-hung"
DURING_COMMIT = "_dbresilience_during_commit"  # raised by COMMIT


def during_commit(exc: BaseException) -> bool:
    """True when ``exc`` (or the driver error it wraps) was raised by COMMIT."""
    orig = getattr(exc, "orig", None)
    return bool(getattr(exc, DURING_COMMIT, False) or getattr(orig, DURING_COMMIT, False))


class EngineResilience:
    """Per-engine state: policy, driver, stats, breaker, bounded calls. One per engine."""

    def __init__(self, engine: Engine, policy: Policy) -> None:
        self.policy = policy
        self.driver: Driver = driver_for(engine.dialect.driver)
        self.name = mask_url(engine.url)
        self.stats = Stats(self.name)
        self.is_async = bool(engine.dialect.is_async)
        self.engine_ref = weakref.ref(engine)
        self.breaker: CircuitBreaker | None = None
        if policy.circuit_breaker:
            self.breaker = CircuitBreaker(
                failures=policy.breaker_failures,
                min_duration=policy.breaker_min_duration,
                probe_wait_initial=policy.connect_wait_initial,
                probe_wait_max=policy.connect_wait_max,
            )
        # Seconds the watchdog gives each blocking driver call (0: not needed / turned off).
        # The hang monitor watches the calls the watchdog has armed: with no command_timeout
        # they are armed with a deadline that never comes.
        bound = policy.command_timeout or (NO_DEADLINE if policy.hang_threshold else 0.0)
        self.call_bound = bound if self.driver.needs_watchdog else 0.0
        self.armed = watchdog.armed  # hot paths arm inline: armed[conn] = (deadline, self, now)
        # Calls the watchdog cut off -> (when: monotonic s, why); popped by the statement guard.
        self.cut: dict[Any, tuple[float, str]] = {}
        self.monitor: Any = None  # the HangMonitor, when hang_threshold is set
        # The exporters' timing recorders by timing (dbresilience._exporters._timings).
        self.recorders: dict[str, tuple[Any, ...]] = {}
        # DBAPI connections whose SQLAlchemy transaction has begun and run no statement yet
        # (hooks.statements: only their next statement may be replayed as a first one).
        self.begun: set[Any] = set()
        # One item per checkout in progress (its length: PoolStats.waiting).
        self.pending: collections.deque[None] = collections.deque()
        # (host, port) -> when it answered a write with 25006 while in recovery: new
        # connections try it last, the most recent last (hooks.errors / hooks.connect).
        self.in_recovery_at: dict[tuple[str, int], float] = {}
        if self.call_bound:
            watchdog.start()

    def after_fork_in_child(self) -> None:
        """Locks held by a thread of the parent at ``fork()`` would never be released."""
        self.stats.reset_lock()
        if self.breaker is not None:
            self.breaker.after_fork_in_child()
        self.cut.clear()
        self.begun.clear()
        if self.monitor is not None:
            self.monitor.after_fork_in_child()

    # -- bounded calls -------------------------------------------------------------------------

    def arm(self, dbapi_conn: Any, seconds: float | None = None) -> Any:
        """Start the watchdog on a blocking call on ``dbapi_conn`` (for ``seconds``, default
        ``command_timeout``); pass the result to :meth:`disarm` in a ``finally``."""
        bound = self.call_bound if seconds is None else seconds
        if not bound:
            return None
        raw = getattr(dbapi_conn, "dbapi_connection", dbapi_conn)  # unwrap the pool proxy
        watchdog.arm(bound, raw, self)
        return raw

    def disarm(self, armed: Any) -> str | None:
        """Stop watching the call :meth:`arm` armed; why the watchdog had cut it off, if it
        had (``"deadline"``, ``"dead-link"``, ``"host-hung"``)."""
        if armed is None:
            return None
        watchdog.disarm(armed)
        if not self.cut:
            return None
        mark = self.cut.pop(armed, None)
        return None if mark is None else mark[1]

    def fileno(self, connection: Any) -> int:
        """The socket of one of this engine's DBAPI connections, or of the pool's proxy of
        one (for the watchdog)."""
        return self.driver.fileno(getattr(connection, "dbapi_connection", connection))

    def cutting(self, connection: Any, reason: str) -> Callable[[], None] | None:
        """The watchdog is about to cut the call on ``connection`` off: remember it, so that
        the statement is reported as cut (never replayed), and return its cancel request
        (none when the host does not answer)."""
        now = time.monotonic()
        cut = self.cut
        if len(cut) > 64:  # marks of calls that returned anyway
            for key, (when, _) in list(cut.items()):
                if now - when > 60.0:
                    cut.pop(key, None)
        cut[connection] = (now, reason)
        # Counted before the caller wakes up and looks; logged and announced by overran().
        self.stats.count(self._cut_event(reason))
        if reason == "host-hung":
            return None
        raw = getattr(connection, "dbapi_connection", connection)
        return self.driver.canceller(raw, timeout=min(self.policy.connect_timeout, 5.0))

    def _cut_event(self, reason: str) -> StatementTimedOut | HangAbort:
        if reason == "deadline":
            return StatementTimedOut(self.name)
        return HangAbort(self.name, reason)

    def overran(self, reason: str) -> None:
        """The watchdog has shut a connection down (after :meth:`cutting`): log and announce
        it."""
        self.stats.emit(self._cut_event(reason), counted=True)
        if reason == "deadline":
            logger.warning(
                "no answer from the server within command_timeout=%.1fs: connection shut "
                "down and a cancel request sent, engine=%s",
                self.call_bound,
                self.name,
            )

    def abort(self, dbapi_conn: Any) -> None:
        """Close a DBAPI connection at once, without I/O (safe in a cancelled task)."""
        with contextlib.suppress(Exception):
            self.driver.abort(dbapi_conn)

    def sleep(self, seconds: float) -> None:
        """Sleep without blocking an event loop when the engine is async (greenlet context)."""
        if self.is_async:
            await_only(asyncio.sleep(seconds))
        else:
            time.sleep(seconds)
