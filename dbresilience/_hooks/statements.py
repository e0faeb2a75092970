"""The statement guard (the dialect's ``do_execute``/``do_executemany``/
``do_execute_no_params``, wrapped): the watchdog bound on every statement, and replay of the
first statement of a transaction that failed only because the connection was already dead.

Replay happens only for the first statement SQLAlchemy runs after beginning a transaction
(``do_begin``, wrapped, marks the connection; any statement consumes the mark) when the driver
also reported no open transaction before it ran (nothing of it can have committed), or in
autocommit for executions marked
``dbresilience_idempotent=True``; never for insertmanyvalues batches, whose cursor SQLAlchemy
keeps. On the new connection the pool's ``checkout`` listeners run first (its ``connect``
listeners ran when it was made), and the connection's characteristics (isolation level...)
are re-applied. A statement cut off by the watchdog is never replayed: it may still be running
(the server was asked to cancel it); it is marked for the ``handle_error`` hook, which reports
a :class:`StatementTimeout`.

Wrapped rather than listened to (``do_execute`` events): SQLAlchemy then calls straight into
the wrapper, the hottest path of all, and a user's ``do_execute`` listener that runs
statements itself keeps working (the bound and replay then do not apply to that statement).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.engine.interfaces import Dialect, ExecuteStyle

from dbresilience import _sqla
from dbresilience._classification import ErrorKind, classify
from dbresilience._drivers import Position
from dbresilience._events import Invalidation, Replay
from dbresilience._hooks._state import (
    CUT_OFF,
    CUT_REASON,
    FROM_DRIVER,
    EngineResilience,
    statement_deadline,
)

__all__ = ["IDEMPOTENT_OPTION", "StatementGuard"]

IDEMPOTENT_OPTION = "dbresilience_idempotent"

_STARTS_TRANSACTION = Position.STARTS_TRANSACTION  # module globals: read on every statement
_AUTOCOMMIT = Position.AUTOCOMMIT
_IN_TRANSACTION = Position.IN_TRANSACTION
_MAX_BEGUN = 10_000
_monotonic = time.monotonic


class StatementGuard:
    """Bounds and, when safe, replays the statements of one engine."""

    def __init__(self, state: EngineResilience) -> None:
        self.state = state

    def install(self, dialect: Dialect) -> None:
        """Wrap the dialect's three ``do_execute*`` methods, and ``do_begin``."""
        self._note_begins(dialect)
        dialect.do_execute = self._guard(  # type: ignore[method-assign]
            dialect.do_execute, "execute", DefaultDialect.do_execute
        )
        dialect.do_executemany = self._guard(  # type: ignore[method-assign]
            dialect.do_executemany, "executemany", DefaultDialect.do_executemany
        )
        no_params = dialect.do_execute_no_params

        def call_no_params(cursor: Any, statement: str, _: Any, context: Any = None) -> None:
            no_params(cursor, statement, context)

        guarded = self._guard(call_no_params, "execute", None)

        def do_execute_no_params(cursor: Any, statement: str, context: Any = None) -> None:
            guarded(cursor, statement, None, context)

        dialect.do_execute_no_params = do_execute_no_params  # type: ignore[method-assign]

    def _note_begins(self, dialect: Dialect) -> None:
        """Remember the DBAPI connections on which SQLAlchemy has just begun a transaction
        and run no statement yet: only such a statement may be replayed as a transaction's
        first. (A driver's own view can be wrong: SQLAlchemy's asyncpg adapter forgets its
        transaction when the app closes the DBAPI connection mid-transaction, and the next
        statement would look like a first one, the earlier ones lost with the connection.)"""
        begun = self.state.begun
        do_begin = dialect.do_begin
        default = getattr(do_begin, "__func__", None) is DefaultDialect.do_begin  # a no-op

        def begin(dbapi_connection: Any) -> None:
            if not default:
                do_begin(dbapi_connection)
            if len(begun) > _MAX_BEGUN:  # transactions that ran no statement: forget them
                begun.clear()
            begun.add(getattr(dbapi_connection, "dbapi_connection", dbapi_connection))

        dialect.do_begin = begin  # type: ignore[method-assign]

    def _guard(
        self, original: Callable[..., Any], method: str, default: Callable[..., Any] | None
    ) -> Callable[..., None]:
        """``original`` (a dialect's ``do_execute``-like method) bounded by the watchdog and
        replayed when safe. When it is SQLAlchemy's ``default`` the cursor's ``method`` is
        called directly: one frame less on every statement."""
        state = self.state
        direct = default is not None and getattr(original, "__func__", None) is default
        position_of = state.driver.statement_position
        armed = state.armed
        bound = state.call_bound
        reconnect = self._reconnect_for_replay
        replay = self._replay
        cut = state.cut
        fairy_of = _sqla.fairy_of_context
        limit_of = statement_deadline.get
        begun = state.begun

        def guarded(cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
            if context is None:  # called outside any execution: nothing to replay it with
                return original(cursor, statement, parameters, context)  # type: ignore[no-any-return]
            raw = fairy_of(context).dbapi_connection
            # Read *before* executing: afterwards a broken connection reports nothing useful.
            position = position_of(raw)
            # Every statement consumes the mark, whatever the driver says: a "begin"
            # listener's statement runs before do_begin, and the app's first one then looks
            # like a later one; a mark left behind would pass a later statement as a first.
            if raw in begun:
                begun.discard(raw)
            elif position is _STARTS_TRANSACTION:  # not the first statement of its transaction
                position = _IN_TRANSACTION
            if bound:  # the watchdog, armed inline
                now = _monotonic()
                until = now + bound
                limit = limit_of()  # run_transaction's deadline
                if limit is not None and limit < until:
                    until = limit
                armed[raw] = (until, state, now)
            try:
                if direct:
                    getattr(cursor, method)(statement, parameters)
                else:
                    original(cursor, statement, parameters, context)
                return None
            except Exception as exc:
                with contextlib.suppress(AttributeError):  # exception types with __slots__
                    setattr(exc, FROM_DRIVER, True)
                if bound:
                    armed.pop(raw, None)
                    mark = cut.pop(raw, None) if cut else None
                    if mark is not None:
                        # Cut off by the watchdog or the hang monitor: it may have run, or
                        # still be running. Never replayed.
                        with contextlib.suppress(AttributeError):
                            setattr(exc, CUT_OFF, position)
                            setattr(exc, CUT_REASON, mark[1])
                        raise
                new_cursor = reconnect(exc, position, context)
                if new_cursor is None:
                    raise
            finally:
                if bound:
                    armed.pop(raw, None)
            # Outside the except block: an error of the replay is not chained to the first one.
            replay(new_cursor, context, original, statement, parameters, position)
            return None

        return guarded

    def _reconnect_for_replay(
        self, exc: Exception, position: Position, context: Any
    ) -> Any | None:
        """After ``exc`` from a statement: when it is safe to run it again, swap a new
        connection in and return a cursor on it; ``None`` lets ``exc`` propagate."""
        state = self.state
        if not (
            state.policy.replay_first_statement
            and (
                position is _STARTS_TRANSACTION
                or (
                    position is _AUTOCOMMIT
                    and bool(context.execution_options.get(IDEMPOTENT_OPTION))
                )
            )
            and _sqla.record_of(_sqla.fairy_of_context(context)) is not None  # not detached
            # SQLAlchemy runs its batches on, and fetches their RETURNING rows from, the
            # cursor it made: a new one would not be seen.
            and context.execute_style is not ExecuteStyle.INSERTMANYVALUES
        ):
            return None
        found = state.driver.refine(exc, classify(exc))
        if found.kind is not ErrorKind.DISCONNECT:
            return None
        # Like SQLAlchemy's default for disconnects: connections older than this one are
        # suspect too (a restart kills them all); they are recycled at their next checkout.
        _sqla.invalidate_older(context.root_connection.engine.pool, context, exc)
        new_cursor = _reconnect(context, exc)
        stats = state.stats
        stats.emit(Invalidation(state.name, "pool", "dead at first statement"))
        stats.retry("statement", 1, 0.0, found)
        stats.emit(Replay(state.name, found))
        return new_cursor

    def _replay(
        self,
        cursor: Any,
        context: Any,
        call: Callable[..., Any],
        statement: str,
        parameters: Any,
        position: Position,
    ) -> None:
        """Run the statement again on ``cursor`` (from :meth:`_reconnect_for_replay`)."""
        state = self.state
        key = state.arm(_sqla.fairy_of_context(context).dbapi_connection)
        try:
            call(cursor, statement, parameters, context)
        except Exception as exc:
            with contextlib.suppress(AttributeError):
                setattr(exc, FROM_DRIVER, True)
            reason = state.disarm(key)
            key = None
            if reason is not None:
                with contextlib.suppress(AttributeError):
                    setattr(exc, CUT_OFF, position)
                    setattr(exc, CUT_REASON, reason)
            raise
        finally:
            state.disarm(key)
        context.cursor = cursor


def _reconnect(context: Any, exc: BaseException) -> Any:
    """Swap a fresh DBAPI connection under the caller's Connection; return a new cursor.

    Mirrors what SQLAlchemy's pool does for a connection found dead at checkout
    (``_ConnectionFairy._checkout``): invalidate the record, then reconnect it in place.
    """
    fairy = _sqla.fairy_of_context(context)
    record = _sqla.record_of(fairy)
    connection = context.root_connection
    # The resets SQLAlchemy runs at checkin (isolation level and other characteristics set
    # for this checkout): invalidate() drops them with the old connection, the new one needs
    # them as much.
    resets = list(_sqla.finalize_callbacks(record))
    record.invalidate(exc)
    fairy.dbapi_connection = record.get_connection()
    _sqla.finalize_callbacks(record).extend(resets)
    # What the pool's checkout listeners set (SET ROLE, search_path...) belongs to the new
    # connection too: the pool ran them on the old one only.
    checkout = connection.engine.pool.dispatch.checkout
    if checkout:
        checkout(fairy.dbapi_connection, record, fairy)
    _sqla.reapply_characteristics(connection, fairy.dbapi_connection)
    return context.create_cursor()
