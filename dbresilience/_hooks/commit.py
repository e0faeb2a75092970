"""COMMIT and ROLLBACK (the dialect's ``do_commit``/``do_rollback``, wrapped: no SQLAlchemy
event exists for them).

* COMMIT: verified by :class:`~dbresilience._commit_outcome.CommitResolver` when the
  connection dies meanwhile; a failure is marked so that the ``handle_error`` hook reports a
  lost connection as :class:`CommitOutcomeUnknown` (or, verified aborted, a retryable
  disconnect; cut off by ``command_timeout`` and verified aborted, a timeout), never as a
  plain retryable disconnect.
* ROLLBACK on a dead connection: the server has already discarded the transaction, so the
  rollback's purpose is met. The connection is closed (the pool replaces it at the next
  checkout) instead of raising at the end of a ``with`` block.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.pool import PoolProxiedConnection

from dbresilience import _sqla
from dbresilience._classification import classify
from dbresilience._commit_outcome import CommitResolver
from dbresilience._drivers import Position
from dbresilience._hooks._state import (
    CUT_OFF,
    CUT_REASON,
    DURING_COMMIT,
    FROM_DRIVER,
    EngineResilience,
)

__all__ = ["install_commit_and_rollback"]

_monotonic = time.monotonic


def _mark(exc: BaseException, *marks: tuple[str, object]) -> None:
    with contextlib.suppress(AttributeError):  # exception types with __slots__
        for name, value in marks:
            setattr(exc, name, value)


def install_commit_and_rollback(state: EngineResilience, engine: Engine) -> None:
    """Wrap ``engine``'s dialect's ``do_commit`` and ``do_rollback``; listen to ``connect``
    (the server's facts, read once per new connection)."""
    dialect = engine.dialect
    do_commit: Callable[[Any], None] = dialect.do_commit
    do_rollback: Callable[[Any], None] = dialect.do_rollback
    engine_ref = state.engine_ref

    def new_connection() -> Any:
        # Outside the pool: it may be exhausted by the very connections whose commits are
        # being checked. Same creator as the pool, so the same do_connect (retries, timeouts).
        live = engine_ref()
        assert live is not None
        return _sqla.invoke_creator(live.pool)(None)

    resolver = CommitResolver(state, new_connection)
    event.listen(engine, "connect", resolver.on_connect)
    verify = state.policy.verify_commits

    def commit(dbapi_connection: Any) -> None:
        key = state.arm(dbapi_connection)
        try:
            if verify:
                resolver.commit(dbapi_connection, do_commit)
            else:
                do_commit(dbapi_connection)
        except Exception as exc:
            reason = state.disarm(key)
            key = None
            _mark(exc, (DURING_COMMIT, True), (FROM_DRIVER, True))
            if reason is not None:
                _mark(exc, (CUT_OFF, Position.IN_TRANSACTION), (CUT_REASON, reason))
            raise
        finally:
            state.disarm(key)

    armed = state.armed
    bound = state.call_bound
    stats = state.stats
    # SQLAlchemy's default do_rollback is the driver's rollback() (unless the engine skips
    # rollbacks in autocommit): then call the driver directly, skipping that method and the
    # pool proxy's __getattr__, two frames on the path of every checkin.
    direct = getattr(do_rollback, "__func__", None) is DefaultDialect.do_rollback
    direct = direct and not getattr(dialect, "skip_autocommit_rollback", False)

    def rollback(dbapi_connection: Any) -> None:
        # Runs at every checkin (SQLAlchemy's reset-on-return): the watchdog armed inline, on
        # the pool's proxy as it comes (the drivers' fileno() see through it).
        if bound:
            now = _monotonic()
            armed[dbapi_connection] = (now + bound, state, now)
        try:
            if direct:
                getattr(dbapi_connection, "dbapi_connection", dbapi_connection).rollback()
            else:
                do_rollback(dbapi_connection)
        except Exception as exc:
            if bound:
                armed.pop(dbapi_connection, None)
                state.cut.pop(dbapi_connection, None)
            if not classify(exc).connection_unusable:
                _mark(exc, (FROM_DRIVER, True))
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
