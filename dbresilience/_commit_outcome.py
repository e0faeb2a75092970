"""Commit-outcome resolution: when the connection dies during COMMIT, ask; never guess.

Before COMMIT we read the transaction's id (``pg_current_xact_id_if_assigned()``; NULL means
the transaction wrote nothing, so there is nothing to lose or duplicate). If the connection
dies while COMMIT is in flight, a new connection asks ``pg_xact_status(xid)``:

- ``committed``: the COMMIT happened; report success and never run the work again;
- ``aborted``: it did not; the caller gets a retryable :class:`DisconnectError`;
- ``in progress``: the old backend has not finished; ask again (bounded);
- anything else, or a server that is not provably the one that assigned the xid:
  :class:`CommitOutcomeUnknown`.

Transaction ids are not unique across a failover (a promoted standby reuses xids the old
primary handed out but never streamed), so each connection's server identity - its
``system_identifier`` and current timeline - is recorded when it connects, and the answer is
trusted only from a server with the same identity.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dbresilience._classification import classify

if TYPE_CHECKING:
    from dbresilience._engine_hooks import EngineResilience

__all__ = ["CommitOutcome", "CommitResolver", "connect_budget"]

_IDENTITY_SQL = (
    "select system_identifier::text, pg_walfile_name(pg_current_wal_lsn()) "
    "from pg_control_system()"
)
_XID_SQL = "select pg_current_xact_id_if_assigned()::text"
# The xid is inlined (digits only, checked) so that the SQL is the same whatever the driver's
# parameter style (psycopg %s, asyncpg $1).
_STATUS_SQL = "select pg_xact_status('{}'::xid8)"
_VERDICT_ATTR = "_dbresilience_commit_verdict"
_IDENTITY_KEY = "dbresilience_server_identity"

#: Seconds a connect may take in the current context (None: the policy's connect_deadline).
connect_budget: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "dbresilience_connect_budget", default=None
)


class CommitOutcome(str, enum.Enum):
    """What resolution found out about a COMMIT whose reply was lost."""

    COMMITTED = "committed"
    ABORTED = "aborted"
    NOTHING_TO_COMMIT = "read-only"
    UNKNOWN = "unknown"


def verdict_of(exc: BaseException) -> CommitOutcome | None:
    """The resolution verdict attached to a failed COMMIT's exception, if any."""
    orig = getattr(exc, "orig", None)
    found = getattr(exc, _VERDICT_ATTR, None) or getattr(orig, _VERDICT_ATTR, None)
    return found if isinstance(found, CommitOutcome) else None


def _one(dbapi_conn: Any, sql: str) -> Any:
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute(sql)
        row = cursor.fetchone()
    finally:
        with contextlib.suppress(Exception):
            cursor.close()
    return None if row is None else row[0]


def _identity(dbapi_conn: Any) -> tuple[str, int]:
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute(_IDENTITY_SQL)
        sysid, walfile = cursor.fetchone()
    finally:
        with contextlib.suppress(Exception):
            cursor.close()
    return str(sysid), int(str(walfile)[:8], 16)  # WAL file names start with the timeline


class CommitResolver:
    """Per-engine commit verification, used by the engine's ``do_commit`` wrapper."""

    def __init__(self, state: EngineResilience, creator: Callable[[], Any]) -> None:
        self._state = state
        self._creator = creator

    def commit(self, dbapi_conn: Any, do_commit: Callable[[Any], None]) -> None:
        """COMMIT on ``dbapi_conn``; resolve the outcome if the connection dies meanwhile."""
        # SQLAlchemy passes its pool proxy; closing *that* would check it in.
        raw = getattr(dbapi_conn, "dbapi_connection", dbapi_conn)
        identity = dbapi_conn.info.get(_IDENTITY_KEY)  # the pool proxy's info: the record's
        try:
            xid = _one(dbapi_conn, _XID_SQL)
        except Exception as exc:
            # COMMIT was never sent: the transaction certainly did not commit.
            with contextlib.suppress(AttributeError):
                setattr(exc, _VERDICT_ATTR, CommitOutcome.ABORTED)
            raise
        try:
            do_commit(dbapi_conn)
            return
        except Exception as exc:
            if not classify(exc).connection_unusable:
                raise
            outcome = self._resolve(xid, identity)
            with contextlib.suppress(Exception):
                raw.close()  # dead anyway; the pool replaces it at the next checkout
            stats = self._state.stats
            stats.incr(f"commit.{outcome.value}")
            if outcome in (CommitOutcome.COMMITTED, CommitOutcome.NOTHING_TO_COMMIT):
                return  # the transaction's work is durable (or there was none)
            with contextlib.suppress(AttributeError):
                setattr(exc, _VERDICT_ATTR, outcome)
            raise

    def on_connect(self, dbapi_conn: Any, record: Any) -> None:
        """Pool ``connect`` listener: record the server identity, outside any app transaction.

        One query per new connection (not per commit). On a standby (no current WAL position)
        the identity is None and commits made there cannot be verified.
        """
        identity: tuple[str, int] | None = None
        try:
            try:
                identity = _identity(dbapi_conn)
            except Exception as exc:
                if classify(exc).connection_unusable:
                    raise
            with contextlib.suppress(Exception):
                dbapi_conn.rollback()
        except BaseException:
            # Failed or cancelled: SQLAlchemy drops the new record without closing the connection.
            with contextlib.suppress(Exception):
                self._state.driver.abort(dbapi_conn)
            raise
        record.info[_IDENTITY_KEY] = identity

    def _resolve(self, xid: str | None, identity: tuple[str, int] | None) -> CommitOutcome:
        if xid is None:
            return CommitOutcome.NOTHING_TO_COMMIT
        if identity is None or not xid.isdigit():  # xid8::text is digits; checked, as inlined
            return CommitOutcome.UNKNOWN
        policy = self._state.policy
        deadline = time.monotonic() + policy.commit_check_timeout
        wait = 0.02
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return CommitOutcome.UNKNOWN
            status: str | None = None
            try:
                status = self._ask(xid, identity, remaining)
            except _NotSameServer:
                return CommitOutcome.UNKNOWN
            except Exception as exc:
                found = classify(exc)
                if not found.retryable:
                    return CommitOutcome.UNKNOWN
                status = "unreachable"
                self._state.stats.retry("commit-check", attempt, wait, found)
            if status == "committed":
                return CommitOutcome.COMMITTED
            if status == "aborted":
                return CommitOutcome.ABORTED
            if status not in ("in progress", "unreachable"):
                return CommitOutcome.UNKNOWN  # NULL: too old to know
            self._state.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            wait = min(wait * 2, 0.5)

    def _ask(self, xid: str, identity: tuple[str, int], budget: float) -> str | None:
        token = connect_budget.set(budget)
        try:
            conn = self._creator()
        finally:
            connect_budget.reset(token)
        key = self._state.arm(conn)  # a silent network must not hang the check
        try:
            if _identity(conn) != identity:
                raise _NotSameServer
            status = _one(conn, _STATUS_SQL.format(xid))
            return None if status is None else str(status)
        finally:
            self._state.disarm(key)
            with contextlib.suppress(Exception):
                conn.close()


class _NotSameServer(Exception):
    """The server answering is not (provably) the one that assigned the xid."""
