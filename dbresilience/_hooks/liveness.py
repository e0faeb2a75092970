"""Vetting the connections the pool hands out (the pool's ``_do_get``, wrapped).

Hooked where the pool takes a connection from its queue (or makes a new one), rather than
listening to the pool's ``checkout`` event: both run before SQLAlchemy makes a cursor, but that
event's dispatch costs as much again as the check itself. A connection used less than
:attr:`Policy.liveness_window` ago only has its driver asked whether it knows it is closed
(no I/O); older ones also get a zero-round-trip socket check (readable while idle: the server
hung up), confirmed by a real ping. When the pool has ``checkout`` listeners (the app's
``SET ROLE``...), they would be the first to meet a dead connection, before any statement we
could replay: then the socket check runs at every checkout. A connection found dead is
invalidated there, and SQLAlchemy's ``_ConnectionRecord.checkout`` reconnects it in place.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import ConnectionPoolEntry, Pool

from dbresilience import _sqla
from dbresilience._events import Invalidation
from dbresilience._hooks._state import EngineResilience
from dbresilience._hooks.connect import Connector

__all__ = ["Liveness"]

_LAST_USED = "dbresilience_last_used"
_monotonic = time.monotonic


class Liveness:
    """Checks, for one engine, every connection its pool hands out."""

    def __init__(self, state: EngineResilience, connector: Connector) -> None:
        self.state = state
        self.connector = connector

    def hook_pool(self, pool: Pool) -> None:
        """Vet every connection ``pool`` hands out, and do the same in the pools that
        ``pool.recreate()`` makes (:meth:`Engine.dispose` replaces the engine's pool)."""
        self.connector.hook_creator(pool)
        closed = self.state.driver.closed
        window = self.state.policy.liveness_window
        vet = self.vet
        dispatch = pool.dispatch
        checkin_failed = _sqla.checkin_failed

        pending = self.state.pending
        stats = self.state.stats

        def vetted(get: Any) -> ConnectionPoolEntry:
            pending.append(None)  # deque.append/pop: atomic, no lock
            try:
                record: ConnectionPoolEntry = get()
            except sa_exc.TimeoutError:  # pool_timeout: no connection came free in time
                stats.incr("pool.timeouts")
                raise
            finally:
                pending.pop()
            try:
                dbapi_conn = record.dbapi_connection
                if dbapi_conn is not None:  # None: invalidated earlier, about to reconnect
                    # record_info: kept across reconnects (info is cleared by get_connection(),
                    # which runs after this; the stamp would be lost with it).
                    info: dict[Any, Any] = record.record_info  # type: ignore[assignment]
                    now = _monotonic()
                    idle = now - info.get(_LAST_USED, now)  # since it was last checked out
                    info[_LAST_USED] = now
                    if closed(dbapi_conn) or idle >= window or dispatch.checkout:
                        vet(record, dbapi_conn)
            except BaseException as exc:  # cancelled mid-ping...: give the connection back
                checkin_failed(record, exc)
                raise
            return record

        _sqla.wrap_do_get(pool, vetted)
        _sqla.on_recreate(pool, self.hook_pool)

    def vet(self, record: ConnectionPoolEntry, dbapi_conn: Any) -> None:
        """Invalidate ``record`` if its connection is closed or looks dead (then confirmed by
        a ping)."""
        driver = self.state.driver
        if not driver.closed(dbapi_conn):
            if not driver.looks_dead(dbapi_conn):
                return  # nothing to read on its idle socket
            # Readable while idle: usually FATAL + EOF from the server; rarely a NOTIFY.
            if self._ping(dbapi_conn):
                return
        stats = self.state.stats
        stats.incr("dead.replaced")
        stats.emit(Invalidation(self.state.name, "connection", "dead at checkout"))
        record.invalidate(sa_exc.DisconnectionError("dbresilience: pooled connection found dead"))

    def _ping(self, dbapi_conn: Any) -> bool:
        state = self.state
        engine = state.engine_ref()
        if engine is None:
            return True
        key = state.arm(dbapi_conn)
        try:
            return bool(engine.dialect.do_ping(dbapi_conn))
        except Exception:
            return False
        finally:
            state.disarm(key)
