"""Engine hooks: the SQLAlchemy event listeners that make an engine resilient.

:func:`install` hooks, on one engine only:

* ``do_connect`` (event) - network defaults (timeouts, keepalives; for asyncpg set on the
  socket). It returns nothing, so the application's own ``do_connect`` listeners (token
  rotation) still run, and run again on every attempt;
* the pool's creator (wrapped) - connect retries with backoff through tenacity, bounded by
  :attr:`Policy.connect_deadline`, behind the circuit breaker; engines made with
  ``creator=`` / ``async_creator=`` get the same (their sockets are tuned after connecting);
* ``handle_error`` (event) - classification, invalidation and re-raising as dbresilience
  errors (also the bare ``OSError``/``TimeoutError`` asyncpg lets escape SQLAlchemy unwrapped);
* the pool's ``_do_get`` (wrapped) - cheap stale-connection detection on every connection the
  pool hands out (no ping per checkout; a socket check on every checkout when the app has
  ``checkout`` listeners, which would otherwise meet a dead connection first);
* the dialect's ``do_execute``/``do_executemany``/``do_execute_no_params`` (wrapped) - the
  watchdog bound on every statement, and replay of the first statement of a transaction that
  failed only because the connection was already dead (on the new connection the pool's
  ``checkout`` listeners run first). A statement cut off by the bound is never replayed: it
  may still be running; the server is asked to cancel it and the caller gets
  :class:`StatementTimeout`;
* the dialect's ``do_commit`` (wrapped) - a connection lost during COMMIT is reported as
  :class:`CommitOutcomeUnknown`, never as a plain disconnect - and ``do_rollback`` (wrapped) -
  a rollback on a dead connection is moot: the server already discarded the transaction.

The hot paths are wrapped rather than listened to where SQLAlchemy's event dispatch would cost
as much as the work itself (see the README's happy-path cost).

Written once for sync and async engines: with an AsyncEngine the listeners run inside
SQLAlchemy's greenlet, where driver calls block only the current task; the only waits of our
own (:meth:`EngineResilience.sleep`) go through the event loop there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import traceback
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import tenacity
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.engine.interfaces import DBAPIConnection, Dialect, ExceptionContext, ExecuteStyle
from sqlalchemy.pool import ConnectionPoolEntry, Pool, PoolProxiedConnection
from sqlalchemy.util import await_only

from dbresilience._circuit_breaker import CircuitBreaker
from dbresilience._classification import Classification, ErrorKind, classify
from dbresilience._commit_outcome import (
    IN_RECOVERY_KEY,
    CommitOutcome,
    CommitResolver,
    connect_budget,
    verdict_of,
)
from dbresilience._drivers import Driver, Position, driver_for, tune_socket
from dbresilience._errors import CircuitOpen, ConfigurationError, error_from, make_error, wrap
from dbresilience._observability import Stats, logger
from dbresilience._policy import Policy
from dbresilience._redaction import mask_url
from dbresilience._retrying import retry_kwargs
from dbresilience._sqla import check_version, reapply_characteristics
from dbresilience._watchdog import watchdog

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["EngineResilience", "get_stats", "install", "resilience_of"]

_LAST_USED = "dbresilience_last_used"
_DURING_COMMIT = "_dbresilience_during_commit"
_CUT_OFF = "_dbresilience_cut_off"  # on a driver error: the Position of a statement cut off
IDEMPOTENT_OPTION = "dbresilience_idempotent"

_IN_TRANSACTION = Position.IN_TRANSACTION  # module globals: read on every statement
_STARTS_TRANSACTION = Position.STARTS_TRANSACTION
_AUTOCOMMIT = Position.AUTOCOMMIT

_monotonic = time.monotonic

# Keyed by dialect: engine.execution_options(...) makes engines that share it (and the pool).
_installed: weakref.WeakKeyDictionary[Dialect, EngineResilience] = weakref.WeakKeyDictionary()
_states: weakref.WeakSet[EngineResilience] = weakref.WeakSet()

_CONNECT_RETRY_KINDS = frozenset(
    {ErrorKind.UNAVAILABLE, ErrorKind.RESOURCE_EXHAUSTED, ErrorKind.DISCONNECT}
)


# Failures that say "the server cannot be reached": the only ones the circuit breaker counts.
_CONNECTIVITY_KINDS = frozenset({ErrorKind.UNAVAILABLE, ErrorKind.DISCONNECT})


def _connect_retryable(exc: BaseException) -> bool:
    return not isinstance(exc, CircuitOpen) and classify(exc).kind in _CONNECT_RETRY_KINDS


def during_commit(exc: BaseException) -> bool:
    """True when ``exc`` (or the driver error it wraps) was raised by COMMIT."""
    orig = getattr(exc, "orig", None)
    return bool(getattr(exc, _DURING_COMMIT, False) or getattr(orig, _DURING_COMMIT, False))


def _after_fork_in_child() -> None:
    # Locks held by a thread of the parent at fork() would never be released in the child.
    for state in list(_states):
        state.stats.reset_lock()
        if state.breaker is not None:
            state.breaker.reset_lock()
        state.cut.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


class EngineResilience:
    """Per-engine state and listeners. One instance per resilient engine."""

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
        self.replay = policy.replay_first_statement
        self.window = policy.liveness_window
        self._position = self.driver.statement_position
        # Seconds the watchdog gives each blocking driver call (0: not needed / turned off).
        self.call_bound = policy.command_timeout if self.driver.needs_watchdog else 0.0
        self._armed = watchdog.armed
        # Calls the watchdog cut off -> when (monotonic s); popped by the statement guard.
        self.cut: dict[Any, float] = {}
        self._do_connect_runs = 0  # how often on_do_connect ran (creator= bypasses it)
        self._warned_creator = False
        if self.call_bound:
            watchdog.start()
        _states.add(self)

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

    def disarm(self, armed: Any) -> bool:
        """Stop watching the call :meth:`arm` armed; True when the watchdog had cut it off."""
        if armed is None:
            return False
        watchdog.disarm(armed)
        return bool(self.cut) and self.cut.pop(armed, None) is not None

    def fileno(self, connection: Any) -> int:
        """The socket of one of this engine's DBAPI connections, or of the pool's proxy of
        one (for the watchdog)."""
        return self.driver.fileno(getattr(connection, "dbapi_connection", connection))

    def cutting(self, connection: Any) -> Callable[[], None] | None:
        """The watchdog is about to cut the call on ``connection`` off: remember it, so that
        the statement is reported as cut (never replayed), and return its cancel request."""
        now = _monotonic()
        cut = self.cut
        if len(cut) > 64:  # marks of calls that returned anyway
            for key, when in list(cut.items()):
                if now - when > 60.0:
                    cut.pop(key, None)
        cut[connection] = now
        self.stats.incr("watchdog.fired")  # before the caller wakes up and looks
        raw = getattr(connection, "dbapi_connection", connection)
        return self.driver.canceller(raw, timeout=min(self.policy.connect_timeout, 5.0))

    def overran(self) -> None:
        """The watchdog shut a connection down: log it."""
        logger.warning(
            "no answer from the server within command_timeout=%.1fs: connection shut down and "
            "a cancel request sent, engine=%s",
            self.call_bound,
            self.name,
        )

    def abort(self, dbapi_conn: Any) -> None:
        """Close a DBAPI connection at once, without I/O (safe in a cancelled task)."""
        with contextlib.suppress(Exception):
            self.driver.abort(dbapi_conn)

    # -- waiting ---------------------------------------------------------------------------

    def sleep(self, seconds: float) -> None:
        """Sleep without blocking an event loop when the engine is async (greenlet context)."""
        if self.is_async:
            await_only(asyncio.sleep(seconds))
        else:
            time.sleep(seconds)

    # -- connect -----------------------------------------------------------------------------

    def on_do_connect(
        self, dialect: Dialect, conn_rec: ConnectionPoolEntry, cargs: Any, cparams: dict[str, Any]
    ) -> None:
        """``do_connect`` listener: network defaults only. Returns None, so the app's own
        ``do_connect`` listeners run after it (and may override what it set)."""
        self._do_connect_runs += 1
        self.driver.apply_network_defaults(cparams, self.policy, budget=connect_budget.get())

    def hook_creator(self, pool: Pool) -> None:
        """Wrap ``pool``'s creator (SQLAlchemy's, which runs the ``do_connect`` listeners, or
        the app's ``creator=``): every new connection goes through :meth:`connect`."""
        if getattr(pool._creator, "_dbresilience_state", None) is self:
            return  # pool.recreate() hands our wrapper over
        invoke: Callable[[Any], DBAPIConnection] = pool._invoke_creator

        def creator(connection_record: ConnectionPoolEntry | None = None) -> DBAPIConnection:
            return self.connect(invoke, connection_record)

        creator._dbresilience_state = self  # type: ignore[attr-defined]
        pool._creator = creator

    def connect(
        self,
        invoke: Callable[[Any], DBAPIConnection],
        record: ConnectionPoolEntry | None,
    ) -> DBAPIConnection:
        """A new connection: retried with backoff within the connect deadline (or the commit
        check's budget), through the circuit breaker (except for commit checks)."""
        budget = connect_budget.get()  # set while a commit check connects
        breaker = self.breaker if budget is None else None
        if breaker is not None and breaker.rejecting():
            raise self._circuit_open(breaker)  # before building any retry machinery
        policy = self.policy
        deadline = policy.connect_deadline
        if budget is not None:
            deadline = min(budget, deadline)
        retrying = tenacity.Retrying(
            sleep=self.sleep,
            **retry_kwargs(
                "connect",
                attempts=1_000_000,  # bounded by the deadline
                deadline=deadline,
                wait_initial=policy.connect_wait_initial,
                wait_max=policy.connect_wait_max,
                stats=self.stats,
                retry_if=_connect_retryable,
            ),
        )
        runs = self._do_connect_runs
        try:
            connection: DBAPIConnection = retrying(self._connect_once, invoke, record, breaker)
        except Exception as exc:
            if isinstance(exc, (sa_exc.SQLAlchemyError, self._dbapi_error)):
                raise  # SQLAlchemy wraps driver errors and on_handle_error classifies them
            raise self._connect_error(exc) from exc
        except BaseException as exc:
            # Cancelled mid-connect: the driver's half-made connection lives in the finished
            # frames of this traceback, which tenacity's retry state keeps in a reference cycle;
            # clear them so it is closed now, not at the next full garbage collection.
            traceback.clear_frames(exc.__traceback__)
            raise
        if self._do_connect_runs == runs:  # made by the app's creator=, not from the URL
            self._made_by_creator(connection)
        self.driver.configure(connection, policy)
        if self.call_bound:
            watchdog.ensure_alive()
        return connection

    @property
    def _dbapi_error(self) -> type[Exception]:
        engine = self.engine_ref()
        dbapi = None if engine is None else engine.dialect.loaded_dbapi
        error: type[Exception] = getattr(dbapi, "Error", Exception)
        return error

    def _made_by_creator(self, connection: Any) -> None:
        """Tune a connection the app's ``creator=`` made: keepalives and TCP_USER_TIMEOUT on
        its socket; a connect timeout cannot be given after the fact: say so, once."""
        with contextlib.suppress(Exception):
            fd = self.driver.fileno(connection)
            with socket.socket(fileno=os.dup(fd)) as sock:
                tune_socket(sock, self.policy)
        if not self._warned_creator:
            self._warned_creator = True
            logger.warning(
                "engine %s connects through creator=: dbresilience retries its connects and "
                "bounds its statements, but cannot bound a connect attempt itself: pass a "
                "connect timeout to the driver in your creator",
                self.name,
            )

    def _connect_once(
        self,
        invoke: Callable[[Any], DBAPIConnection],
        record: ConnectionPoolEntry | None,
        breaker: CircuitBreaker | None,
    ) -> DBAPIConnection:
        """One connect attempt (running the app's ``do_connect`` listeners), through the
        circuit breaker."""
        if breaker is None:
            return invoke(record)
        if not breaker.allow():
            raise self._circuit_open(breaker)
        try:
            connection: DBAPIConnection = invoke(record)
        except Exception as exc:
            self.stats.incr("connect.failed")
            if classify(exc).kind not in _CONNECTIVITY_KINDS:
                breaker.record_success()  # reached the server (e.g. auth failed): not down
            elif breaker.record_failure():
                self.stats.incr("breaker.opened")
                logger.warning("circuit breaker opened for %s", self.name)
            raise
        except BaseException:
            breaker.abandon()  # cancelled: let another caller probe
            raise
        breaker.record_success()
        return connection

    def _circuit_open(self, breaker: CircuitBreaker) -> Exception:
        wait = breaker.retry_after()
        error = make_error(
            CircuitOpen,
            f"circuit breaker open: failing fast without connecting to {self.name}; "
            f"next probe in {wait:.1f}s",
            Classification(ErrorKind.UNAVAILABLE, None, "circuit open"),
        )
        error.retry_after = wait  # type: ignore[attr-defined]
        self.stats.incr("breaker.fail_fast")
        return error

    def _connect_error(self, exc: Exception) -> Exception:
        """What to raise for a non-DBAPI connect failure (asyncpg: bare ``OSError``...)."""
        found = classify(exc)
        if found.kind is ErrorKind.APPLICATION:
            return exc
        if found.kind is ErrorKind.DISCONNECT:  # lost while connecting: could not connect
            found = Classification(ErrorKind.UNAVAILABLE, found.sqlstate, found.reason)
        self.stats.incr(f"error.{found.kind.value}")
        return error_from(exc, found)

    # -- stale-connection detection ----------------------------------------------------------

    def hook_pool(self, pool: Pool) -> None:
        """Vet every connection ``pool`` hands out, and do the same in the pools that
        ``pool.recreate()`` makes (:meth:`Engine.dispose` replaces the engine's pool).

        Hooked into ``Pool._do_get``, where the pool takes a connection from its queue (or
        makes a new one), rather than listening to the pool's ``checkout`` event: both run
        before SQLAlchemy makes a cursor, but that event's dispatch costs as much again as the
        check itself. A connection found dead is invalidated there, and SQLAlchemy's
        ``_ConnectionRecord.checkout`` reconnects it in place.
        """
        self.hook_creator(pool)
        get = pool._do_get
        recreate = pool.recreate
        closed = self.driver.closed
        window = self.window
        vet = self._vet
        dispatch = pool.dispatch

        def _do_get() -> ConnectionPoolEntry:
            record = get()
            try:
                dbapi_conn = record.dbapi_connection
                if dbapi_conn is not None:  # None: invalidated earlier, about to reconnect
                    # record_info: kept across reconnects (info is cleared by get_connection(),
                    # which runs after this; the stamp would be lost with it).
                    info: dict[Any, Any] = record.record_info  # type: ignore[assignment]
                    now = _monotonic()
                    idle = now - info.get(_LAST_USED, now)  # since it was last checked out
                    info[_LAST_USED] = now
                    # The app's checkout listeners (SET ROLE...) would be the first to meet a
                    # dead connection, before any statement we could replay: look every time.
                    if closed(dbapi_conn) or idle >= window or dispatch.checkout:
                        vet(record, dbapi_conn)
            except BaseException as exc:  # cancelled mid-ping...: give the connection back
                record._checkin_failed(exc, _fairy_was_created=False)  # type: ignore[attr-defined]
                raise
            return record

        def _recreate() -> Pool:
            new = recreate()
            self.hook_pool(new)
            return new

        pool._do_get = _do_get  # type: ignore[method-assign]
        pool.recreate = _recreate  # type: ignore[method-assign]

    def _vet(self, record: ConnectionPoolEntry, dbapi_conn: Any) -> None:
        """Invalidate ``record`` if its connection is closed or, having been idle past
        :attr:`Policy.liveness_window`, looks dead (then confirmed by a ping)."""
        if not self.driver.closed(dbapi_conn):
            if not self.driver.looks_dead(dbapi_conn):
                return  # nothing to read on its idle socket
            # Readable while idle: usually FATAL + EOF from the server; rarely a NOTIFY.
            if self._ping(dbapi_conn):
                return
        self.stats.incr("dead.replaced")
        record.invalidate(sa_exc.DisconnectionError("dbresilience: pooled connection found dead"))

    def _ping(self, dbapi_conn: Any) -> bool:
        engine = self.engine_ref()
        if engine is None:
            return True
        key = self.arm(dbapi_conn)
        try:
            return bool(engine.dialect.do_ping(dbapi_conn))
        except Exception:
            return False
        finally:
            self.disarm(key)

    # -- errors ------------------------------------------------------------------------------

    def on_handle_error(self, ctx: ExceptionContext) -> BaseException | None:
        if ctx.is_pre_ping:
            return None
        original = ctx.original_exception
        cut_at = getattr(original, _CUT_OFF, None)
        if isinstance(cut_at, Position):
            return self._cut_off_error(ctx, cut_at)
        found = classify(original)
        if found.sqlstate == "25006" and self._in_recovery(ctx):
            # Read-only because the server is a standby (or a demoted primary): failover.
            found = Classification(ErrorKind.UNAVAILABLE, "25006", "read-only: server in recovery")
        if during_commit(original) and found.connection_unusable:
            if verdict_of(original) is CommitOutcome.ABORTED:
                found = Classification(
                    ErrorKind.DISCONNECT,
                    found.sqlstate,
                    f"connection lost during COMMIT; verified not committed ({found.reason})",
                )
            else:
                found = Classification(
                    ErrorKind.COMMIT_OUTCOME_UNKNOWN,
                    found.sqlstate,
                    f"connection lost during COMMIT ({found.reason})",
                )
        else:
            found = self.driver.refine(original, found)
        unknown = found.kind is ErrorKind.APPLICATION
        if unknown and ctx.is_disconnect and isinstance(original, Exception):
            # The dialect saw the connection closed/broken although we know no rule for this
            # error's text: trust it, the connection is gone.
            reason = f"dialect reports a disconnect ({found.reason})"
            found = Classification(ErrorKind.DISCONNECT, found.sqlstate, reason)
        if found.kind is ErrorKind.APPLICATION:
            return None
        if found.connection_unusable:
            ctx.is_disconnect = True
        self.stats.incr(f"error.{found.kind.value}")
        sa_error = ctx.sqlalchemy_exception
        if isinstance(sa_error, sa_exc.DBAPIError):
            return wrap(sa_error, found, connection_invalidated=ctx.is_disconnect)
        if isinstance(original, Exception) and not isinstance(original, sa_exc.SQLAlchemyError):
            # Not a DBAPI error, so SQLAlchemy did not wrap it (asyncpg's TimeoutError...).
            return error_from(
                original, found, statement=ctx.statement, connection_invalidated=ctx.is_disconnect
            )
        return None

    @staticmethod
    def _in_recovery(ctx: ExceptionContext) -> bool:
        """Was the connection's server in recovery (a standby) when it connected?"""
        connection = ctx.connection
        if connection is None or connection.invalidated:
            return False
        return bool(connection.info.get(IN_RECOVERY_KEY))

    def _cut_off_error(self, ctx: ExceptionContext, position: Position) -> BaseException | None:
        """The error for a statement the watchdog cut off: a timeout that says what is known."""
        if position is _AUTOCOMMIT:
            outcome = "in autocommit mode it may have completed: its outcome is unknown"
        else:
            outcome = "the transaction did not commit (its connection is closed)"
        reason = (
            f"no reply within command_timeout={self.call_bound:g}s: the statement was cut off "
            f"and the server asked to cancel it; it was not run again, and {outcome}"
        )
        found = Classification(ErrorKind.TIMEOUT, None, reason)
        ctx.is_disconnect = True
        self.stats.incr(f"error.{found.kind.value}")
        sa_error = ctx.sqlalchemy_exception
        original = ctx.original_exception
        if isinstance(sa_error, sa_exc.DBAPIError):
            error = wrap(sa_error, found, connection_invalidated=True)
        elif isinstance(original, Exception):
            error = error_from(
                original, found, statement=ctx.statement, connection_invalidated=True
            )
        else:
            return None
        error.add_detail(f"dbresilience: {reason}")
        return error

    # -- statements: first-statement replay, watchdog ------------------------------------------

    def wrap_execute(self, dialect: Dialect) -> None:
        """Wrap the dialect's ``do_execute``, ``do_executemany`` and ``do_execute_no_params``:
        the watchdog bound on every statement, and replay of the first statement of a
        transaction that failed only because the connection was already dead.

        Wrapped rather than listened to (``do_execute`` events): SQLAlchemy then calls straight
        into the wrapper, the hottest path of all, and a user's ``do_execute`` listener that
        runs statements itself keeps working.
        """
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

    def _guard(
        self, original: Callable[..., Any], method: str, default: Callable[..., Any] | None
    ) -> Callable[..., None]:
        """``original`` (a dialect's ``do_execute``-like method) bounded by the watchdog and
        replayed when safe. When it is SQLAlchemy's ``default`` the cursor's ``method`` is
        called directly: one frame less on every statement."""
        direct = default is not None and getattr(original, "__func__", None) is default
        position_of = self._position
        armed = self._armed
        bound = self.call_bound
        reconnect = self._reconnect_for_replay
        replay = self._replay
        cut = self.cut

        def guarded(cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
            if context is None:  # called outside any execution: nothing to replay it with
                return original(cursor, statement, parameters, context)  # type: ignore[no-any-return]
            raw = context._dbapi_connection.dbapi_connection
            # Read *before* executing: afterwards a broken connection reports nothing useful.
            position = position_of(raw)
            if bound:  # the watchdog, armed inline
                armed[raw] = (_monotonic() + bound, self)
            try:
                if direct:
                    getattr(cursor, method)(statement, parameters)
                else:
                    original(cursor, statement, parameters, context)
                return None
            except Exception as exc:
                if bound:
                    armed.pop(raw, None)
                    if cut and cut.pop(raw, None) is not None:
                        # Cut off by the watchdog: it may still be running. Never replayed.
                        with contextlib.suppress(AttributeError):
                            setattr(exc, _CUT_OFF, position)
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
        if not (
            self.replay
            and (
                position is _STARTS_TRANSACTION
                or (
                    position is _AUTOCOMMIT
                    and bool(context.execution_options.get(IDEMPOTENT_OPTION))
                )
            )
            and context._dbapi_connection._connection_record is not None  # not detached
            # SQLAlchemy runs its batches on, and fetches their RETURNING rows from, the
            # cursor it made: a new one would not be seen.
            and context.execute_style is not ExecuteStyle.INSERTMANYVALUES
        ):
            return None
        found = self.driver.refine(exc, classify(exc))
        if found.kind is not ErrorKind.DISCONNECT:
            return None
        # Like SQLAlchemy's default for disconnects: connections older than this one are
        # suspect too (a restart kills them all); they are recycled at their next checkout.
        context.root_connection.engine.pool._invalidate(
            context._dbapi_connection, exc, _checkin=False
        )
        new_cursor = self._reconnect(context, exc)
        self.stats.retry("statement", 1, 0.0, found)
        self.stats.incr("replay.statement")
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
        key = self.arm(context._dbapi_connection.dbapi_connection)
        try:
            call(cursor, statement, parameters, context)
        except Exception as exc:
            if self.disarm(key):
                key = None
                with contextlib.suppress(AttributeError):
                    setattr(exc, _CUT_OFF, position)
            raise
        finally:
            self.disarm(key)
        context.cursor = cursor

    @staticmethod
    def _reconnect(context: Any, exc: BaseException) -> Any:
        """Swap a fresh DBAPI connection under the caller's Connection; return a new cursor.

        Mirrors what SQLAlchemy's pool does for a connection found dead at checkout
        (``_ConnectionFairy._checkout``): invalidate the record, then reconnect it in place.
        """
        fairy = context._dbapi_connection
        record = fairy._connection_record
        connection = context.root_connection
        # The resets SQLAlchemy runs at checkin (isolation level and other characteristics set
        # for this checkout): invalidate() drops them with the old connection, the new one
        # needs them as much.
        resets = list(record.finalize_callback)
        record.invalidate(exc)
        fairy.dbapi_connection = record.get_connection()
        record.finalize_callback.extend(resets)
        # What the pool's checkout listeners set (SET ROLE, search_path...) belongs to the
        # new connection too: the pool ran them on the old one only.
        checkout = connection.engine.pool.dispatch.checkout
        if checkout:
            checkout(fairy.dbapi_connection, record, fairy)
        reapply_characteristics(connection, fairy.dbapi_connection)
        return context.create_cursor()

    # -- commit and rollback ---------------------------------------------------------------

    def wrap_dialect(self, engine: Engine) -> None:
        """Wrap the dialect's ``do_commit``/``do_rollback`` (no SQLAlchemy event exists).

        * COMMIT: a failure is tagged so :meth:`on_handle_error` reports a lost connection
          as :class:`CommitOutcomeUnknown`, never as a plain (retryable) disconnect.
        * ROLLBACK on a dead connection: the server has already discarded the transaction, so
          the rollback's purpose is met. The connection is closed (the pool replaces it at the
          next checkout) instead of raising at the end of a ``with`` block.
        """
        dialect = engine.dialect
        do_commit: Callable[[Any], None] = dialect.do_commit
        do_rollback: Callable[[Any], None] = dialect.do_rollback
        stats = self.stats
        engine_ref = self.engine_ref

        def new_connection() -> Any:
            # Outside the pool: it may be exhausted by the very connections whose commits are
            # being checked. Same creator as the pool, so the same do_connect (retries, timeouts).
            live = engine_ref()
            assert live is not None
            return live.pool._invoke_creator(None)  # type: ignore[arg-type]

        resolver = CommitResolver(self, new_connection)
        # Always: the server's facts (in recovery? identity) are read once per connection.
        event.listen(engine, "connect", resolver.on_connect)
        verify = self.policy.verify_commits

        def commit(dbapi_connection: Any) -> None:
            key = self.arm(dbapi_connection)
            try:
                if verify:
                    resolver.commit(dbapi_connection, do_commit)
                else:
                    do_commit(dbapi_connection)
            except Exception as exc:
                with contextlib.suppress(AttributeError):  # exception types with __slots__
                    setattr(exc, _DURING_COMMIT, True)
                raise
            finally:
                self.disarm(key)

        armed = self._armed
        bound = self.call_bound
        # SQLAlchemy's default do_rollback is the driver's rollback() (unless the engine skips
        # rollbacks in autocommit): then call the driver directly, skipping that method and the
        # pool proxy's __getattr__, two frames on the path of every checkin.
        direct = getattr(do_rollback, "__func__", None) is DefaultDialect.do_rollback
        direct = direct and not getattr(dialect, "skip_autocommit_rollback", False)

        def rollback(dbapi_connection: Any) -> None:
            # Runs at every checkin (SQLAlchemy's reset-on-return): the watchdog armed inline,
            # on the pool's proxy as it comes (the drivers' fileno() see through it).
            if bound:
                armed[dbapi_connection] = (_monotonic() + bound, self)
            try:
                if direct:
                    getattr(dbapi_connection, "dbapi_connection", dbapi_connection).rollback()
                else:
                    do_rollback(dbapi_connection)
            except Exception as exc:
                if bound:
                    armed.pop(dbapi_connection, None)
                    self.cut.pop(dbapi_connection, None)
                if not classify(exc).connection_unusable:
                    raise
                stats.incr("rollback.on_dead_connection")
                # Close the driver connection, not SQLAlchemy's proxy (that would check it in),
                # and have the pool replace it at its next checkout.
                with contextlib.suppress(Exception):
                    getattr(dbapi_connection, "dbapi_connection", dbapi_connection).close()
                if isinstance(dbapi_connection, PoolProxiedConnection):
                    dbapi_connection.invalidate(exc, soft=True)
            finally:
                if bound:
                    armed.pop(dbapi_connection, None)

        dialect.do_commit = commit  # type: ignore[method-assign]
        dialect.do_rollback = rollback  # type: ignore[method-assign]


def _check_engine(engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        raise ConfigurationError(
            f"dbresilience supports PostgreSQL only, not {engine.dialect.name!r} "
            f"(engine {mask_url(engine.url)})"
        )
    driver_for(engine.dialect.driver)  # ValueError naming the driver if unsupported


def _sync_engine(engine: Engine | AsyncEngine) -> Engine:
    # Duck-typed so that importing dbresilience never needs sqlalchemy.ext.asyncio (greenlet).
    sync: Engine = getattr(engine, "sync_engine", None) or engine  # type: ignore[assignment]
    return sync


def install(engine: Engine | AsyncEngine, policy: Policy | None = None) -> EngineResilience:
    """Make an existing engine resilient; return its :class:`EngineResilience` state.

    Installing twice on the same engine raises :class:`ConfigurationError`.
    """
    check_version()
    sync_engine = _sync_engine(engine)
    if not isinstance(sync_engine, Engine):
        raise ConfigurationError(f"install() needs an Engine or AsyncEngine, got {engine!r}")
    _check_engine(sync_engine)
    if sync_engine.dialect in _installed:
        raise ConfigurationError(
            f"dbresilience is already installed on {mask_url(sync_engine.url)}"
        )
    if policy is not None and not isinstance(policy, Policy):
        raise ConfigurationError(f"policy must be a dbresilience.Policy, got {policy!r}")
    state = EngineResilience(sync_engine, policy or Policy())
    event.listen(sync_engine, "do_connect", state.on_do_connect, insert=True)
    event.listen(sync_engine, "handle_error", state.on_handle_error)
    state.wrap_execute(sync_engine.dialect)
    state.hook_pool(sync_engine.pool)
    state.wrap_dialect(sync_engine)
    _installed[sync_engine.dialect] = state
    return state


def resilience_of(engine: Engine | AsyncEngine) -> EngineResilience:
    """The :class:`EngineResilience` of a resilient engine; ``ValueError`` if there is none."""
    sync_engine = _sync_engine(engine)
    try:
        return _installed[sync_engine.dialect]
    except KeyError:
        raise ConfigurationError(
            f"{mask_url(sync_engine.url)} is not a resilient engine: "
            "use create_resilient_engine() or install()"
        ) from None


def get_stats(engine: Engine | AsyncEngine) -> dict[str, int]:
    """Counters of a resilient engine (retries, replays, errors by kind...)."""
    return resilience_of(engine).stats.snapshot()
