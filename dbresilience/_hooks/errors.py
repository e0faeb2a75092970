"""The ``handle_error`` listener: SQLAlchemy's exceptions re-raised as ours when classified.

Only failures that came out of the driver are classified (a DBAPI error, or an exception the
other hooks marked as raised by a driver call: asyncpg lets bare ``OSError`` /
``TimeoutError`` escape). The application's own exceptions that SQLAlchemy reports here too
(a ``TypeDecorator``'s, a ``before_cursor_execute`` listener's) pass through untouched.

What the other hooks marked decides what is known:

* cut off by ``command_timeout`` (never replayed): :class:`StatementTimeout`, saying whether
  the transaction is known not to have committed (autocommit: the outcome is unknown);
* raised by COMMIT on a dead connection: the commit check's verdict; verified aborted is a
  retryable disconnect (a timeout when ``command_timeout`` cut it off), anything else
  :class:`CommitOutcomeUnknown`;
* 25006 (read-only transaction) from a server that was in recovery when the connection was
  made (a standby, a demoted primary): :class:`DatabaseUnavailable`, a failover signal; from a
  primary it is the application's (a read-only role). The connection is invalidated (the pool
  with it) and the server's address noted: new connections of a multi-host URL try it last
  (see ``hooks.connect``), so that the retry reaches the primary.
"""

from __future__ import annotations

import contextlib
import time

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine.interfaces import ExceptionContext

from dbresilience._classification import Classification, ErrorKind, classify
from dbresilience._commit_outcome import IN_RECOVERY_KEY, CommitOutcome, verdict_of
from dbresilience._drivers import Position
from dbresilience._errors import error_from, wrap
from dbresilience._events import Disconnect, Invalidation
from dbresilience._hooks._state import (
    CUT_OFF,
    CUT_REASON,
    FROM_DRIVER,
    EngineResilience,
    during_commit,
    statement_deadline,
)

__all__ = ["ErrorHook"]

_HANG_VERDICTS = {
    "dead-link": "the hang monitor found the link dead (the server was not running the call)",
    "host-hung": "the hang monitor found the server not answering",
}


class ErrorHook:
    """``handle_error`` listener of one engine."""

    def __init__(self, state: EngineResilience) -> None:
        self.state = state

    def __call__(self, ctx: ExceptionContext) -> BaseException | None:
        if ctx.is_pre_ping:
            return None
        original = ctx.original_exception
        dbapi_error = getattr(ctx.dialect.loaded_dbapi, "Error", ())
        if not (isinstance(original, dbapi_error) or getattr(original, FROM_DRIVER, False)):
            return None  # the application's own exception, raised inside SQLAlchemy
        cut_at = getattr(original, CUT_OFF, None)
        cut = isinstance(cut_at, Position)
        why = str(getattr(original, CUT_REASON, "deadline"))
        found = classify(original)
        if during_commit(original) and found.connection_unusable:
            found = self._commit_failure(original, found, why if cut else None)
        elif cut:
            found = self._cut_off(cut_at, why)  # type: ignore[arg-type]
        else:
            if found.sqlstate == "25006" and self._in_recovery(ctx):
                # Read-only because the server is a standby (or a demoted primary): failover.
                found = Classification(
                    ErrorKind.UNAVAILABLE, "25006", "read-only: server in recovery"
                )
                self._note_in_recovery(ctx)
            found = self.state.driver.refine(original, found)
            if found.kind is ErrorKind.APPLICATION and ctx.is_disconnect:
                # The dialect saw the connection closed/broken although we know no rule for
                # this error's text: trust it, the connection is gone.
                reason = f"dialect reports a disconnect ({found.reason})"
                found = Classification(ErrorKind.DISCONNECT, found.sqlstate, reason)
        if found.kind is ErrorKind.APPLICATION:
            return None
        if found.connection_unusable or cut:
            ctx.is_disconnect = True
        if cut and why != "host-hung":
            # Only this connection was cut off (too slow, or its link dead): the server and
            # the other connections are fine. (A hung host: the monitor invalidated the pool.)
            ctx.invalidate_pool_on_disconnect = False
        self._report(ctx, found)
        sa_error = ctx.sqlalchemy_exception
        if isinstance(sa_error, sa_exc.DBAPIError):
            error = wrap(sa_error, found, connection_invalidated=ctx.is_disconnect)
        elif isinstance(original, Exception) and not isinstance(
            original, sa_exc.SQLAlchemyError
        ):
            # Not a DBAPI error, so SQLAlchemy did not wrap it (asyncpg's TimeoutError...).
            error = error_from(
                original, found, statement=ctx.statement, connection_invalidated=ctx.is_disconnect
            )
        else:
            return None
        if cut:
            error.add_detail(f"dbresilience: {found.reason}")
        return error

    def _report(self, ctx: ExceptionContext, found: Classification) -> None:
        """Count the error; announce a lost connection and its invalidation."""
        stats = self.state.stats
        stats.incr(f"error.{found.kind.value}")
        if ctx.connection is None:  # while connecting: the connect hooks report it
            return
        name = self.state.name
        if found.kind is ErrorKind.DISCONNECT:
            stats.emit(Disconnect(name, found))
        if ctx.is_disconnect:  # SQLAlchemy now invalidates the connection (or the pool)
            if ctx.invalidate_pool_on_disconnect:
                stats.emit(Invalidation(name, "pool", found.kind.value))
            else:
                stats.emit(Invalidation(name, "connection", found.kind.value))

    def _cut_off(self, position: Position, why: str) -> Classification:
        autocommit = position is Position.AUTOCOMMIT
        if autocommit:
            outcome = "in autocommit mode it may have completed: its outcome is unknown"
        else:
            outcome = "the transaction did not commit (its connection is closed)"
        if why == "deadline":
            limit = statement_deadline.get()
            within = (
                "run_transaction's deadline"
                if limit is not None and time.monotonic() >= limit - 0.2
                else f"command_timeout={self.state.call_bound:g}s"
            )
            return Classification(
                ErrorKind.TIMEOUT,
                None,
                f"no reply within {within}: the statement was cut off and the server asked to "
                f"cancel it; it was not run again, and {outcome}",
            )
        # The hang monitor: the link is dead (the server says this backend is not running the
        # statement) or the host does not answer. Inside a transaction nothing committed:
        # retryable; in autocommit the statement may have run.
        kind = ErrorKind.COMMIT_OUTCOME_UNKNOWN if autocommit else ErrorKind.DISCONNECT
        return Classification(
            kind, None, f"{_HANG_VERDICTS.get(why, why)}: connection aborted; {outcome}"
        )

    def _commit_failure(
        self, original: BaseException, found: Classification, why: str | None
    ) -> Classification:
        if why is None:
            how = "connection lost during COMMIT"
        elif why == "deadline":
            how = f"COMMIT cut off by command_timeout={self.state.call_bound:g}s"
        else:
            how = f"COMMIT aborted: {_HANG_VERDICTS.get(why, why)}"
        if verdict_of(original) is CommitOutcome.ABORTED:
            # Verified not committed: retryable, unless it was too slow (a timeout, as for a
            # statement: running it again would only be as slow).
            kind = ErrorKind.TIMEOUT if why == "deadline" else ErrorKind.DISCONNECT
            return Classification(
                kind, found.sqlstate, f"{how}; verified not committed ({found.reason})"
            )
        return Classification(
            ErrorKind.COMMIT_OUTCOME_UNKNOWN, found.sqlstate, f"{how} ({found.reason})"
        )

    def _note_in_recovery(self, ctx: ExceptionContext) -> None:
        """Remember that the connection's server refused a write while in recovery: new
        connections try its address last (the most recently noted last)."""
        state = self.state
        with contextlib.suppress(Exception):  # no address (closed meanwhile): nothing to note
            raw = ctx.connection.connection.dbapi_connection  # type: ignore[union-attr]
            address = state.driver.address(raw)
            state.in_recovery_at[address] = time.monotonic()
            state.stats.incr("recovery.write-refused")

    @staticmethod
    def _in_recovery(ctx: ExceptionContext) -> bool:
        """Was the connection's server in recovery (a standby) when it connected?"""
        connection = ctx.connection
        if connection is None or connection.invalidated:
            return False
        return bool(connection.info.get(IN_RECOVERY_KEY))
