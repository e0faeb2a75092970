"""Commit-outcome resolution: when the connection dies during COMMIT, ask; never guess.

Before COMMIT we read the transaction's id (``pg_current_xact_id_if_assigned()``; NULL means
the transaction wrote nothing, so there is nothing to lose or duplicate). If the connection
dies while COMMIT is in flight, a new connection asks ``pg_xact_status(xid)``:

- ``committed``: the COMMIT happened; report success and never run the work again;
- ``aborted``: it did not; the caller gets a retryable :class:`DisconnectError`;
- ``in progress``: the old backend has not finished; ask again (bounded);
- anything else, or a server that is not provably the one that assigned the xid:
  :class:`CommitOutcomeUnknown`.

The whole resolution is bounded by :attr:`Policy.commit_check_timeout`: one checking
connection, made outside the pool and outside the circuit breaker (an open breaker must not
turn a lost COMMIT into an unknown outcome), asks every poll; each query is bounded by what is
left of the budget, the connection is replaced only when it fails, and it is closed whatever
happens, cancellation included.

Transaction ids are not unique across a failover (a promoted standby reuses xids the old
primary handed out but never streamed), so each connection's server identity - its
``system_identifier`` and current timeline - is recorded when it connects, and the answer is
trusted from a server with the same identity, or from a promoted server that proves it
replayed our timeline:

Across a failover. Let ``T`` be our timeline and ``X`` our xid, and let the checking
connection reach a server of the same ``system_identifier`` on another timeline whose latest
checkpoint (``pg_control_checkpoint()``, readable by any role) is on ``T``. That checkpoint is
one this server replayed or started its recovery from (a restartpoint keeps the replayed
checkpoint record's timeline and next xid), so ``T`` is in its history and ``L``, the
checkpoint's ``next_xid``, is at most ``N``, its next xid when recovery ended: replaying an
online checkpoint raises the counter to the record's ``next_xid``, and replaying any record
raises it past the record's xid. Every xid this server (or a server promoted after it) hands
out is at least ``N``. Hence:

- ``X < L``: ``X`` was never handed out again in this history, so its status is our
  transaction's: ``committed`` means our commit record was replayed (the work is in the new
  history, do not run it again); ``aborted`` means it was not (an abort record, or neither:
  a transaction that is neither committed nor running is reported aborted, and ours cannot be
  running there);
- ``X >= L``: ``committed`` may be another transaction's that got ``X`` after the promotion:
  unknown. ``aborted`` and "in the future" still say that our commit record is not in this
  history: a record with xid ``X`` that was replayed would have raised ``N`` past ``X``, so
  ``X``'s status here can only be a new transaction's (``in progress`` too: ask again).

"Not committed" means not committed in the history of the server that now answers: a commit
that reached only the old primary is lost with it, and running the work again is what the
caller wants. The promoted server runs a checkpoint on its new timeline soon after promotion
(a spread one: seconds when the standby had pages to write, at once when it had none); from
then on nothing proves ``T`` is in its history and the outcome is unknown, as it is on any
server whose latest checkpoint is on another timeline (a standby of another branch, a
second promotion). Timeline ids are assumed to name one history (one promotion at a time, or
a shared WAL archive), as the identity check assumes already; and as on a same-timeline
restart, the old primary is assumed not to have crashed, restarted and handed ``X`` out again
between the lost COMMIT and the failover (the answer would then be another transaction's).
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from dbresilience._classification import ErrorKind, classify
from dbresilience._events import CommitResolved
from dbresilience._observability import Stats, logger

__all__ = [
    "IN_RECOVERY_KEY",
    "SERVER_PID_KEY",
    "SYSTEM_ID_KEY",
    "CommitOutcome",
    "CommitResolver",
    "connect_budget",
]

# One query per new connection: is the server a standby, and which server is it? (On a
# standby there is no current WAL position: no identity, and commits there cannot be checked.)
# PostgreSQL 10+ (pg_walfile_name); on an older server it fails and nothing is verified.
# Also when the server started and, when its latest checkpoint is not newer than that start
# (checkpoint times are whole seconds), that checkpoint's next xid: every xid below it was
# handed out before the start (a clean shutdown's checkpoint, or crash recovery's own when it
# ended within the same second), so no transaction since reused one of them.
# And the latest checkpoint's timeline and next xid, whatever its time: after a failover they
# may prove that the promoted server replayed our timeline (see the module docstring).
_FACTS_SQL = (
    "select pg_is_in_recovery(), system_identifier::text, case when pg_is_in_recovery() "
    "then null else pg_walfile_name(pg_current_wal_lsn()) end, "
    "current_setting('server_version_num')::int, "
    "extract(epoch from pg_postmaster_start_time())::float8, "
    "case when c.checkpoint_time <= pg_postmaster_start_time() then c.next_xid end, "
    "pg_backend_pid(), c.timeline_id, c.next_xid "
    "from pg_control_system(), pg_control_checkpoint() c"
)
# The transaction id before COMMIT, and its status later: the xid8 functions of PostgreSQL 13+,
# else the txid_* family (10-12; deprecated since 13). The xid is inlined (digits only,
# checked) so that the SQL is the same whatever the driver's parameter style.
_XID_SQL = "select pg_current_xact_id_if_assigned()::text"
_STATUS_SQL = "select pg_xact_status('{}'::xid8)"
_XID_SQL_10 = "select txid_current_if_assigned()::text"
_STATUS_SQL_10 = "select txid_status({}::bigint)"
_VERDICT_ATTR = "_dbresilience_commit_verdict"
_IDENTITY_KEY = "dbresilience_server_identity"
_STARTED_KEY = "dbresilience_server_started"
#: Connection ``info`` key: True when the server was in recovery (a standby) at connect.
IN_RECOVERY_KEY = "dbresilience_in_recovery"
#: Connection ``info`` key: the server's ``pg_backend_pid()`` for this connection.
SERVER_PID_KEY = "dbresilience_server_pid"
#: Connection ``info`` key: the cluster's system identifier.
SYSTEM_ID_KEY = "dbresilience_system_identifier"

#: Seconds a connect may take in the current context (None: the policy's connect_deadline).
#: Set while a commit check connects; such connects also bypass the circuit breaker.
connect_budget: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "dbresilience_connect_budget", default=None
)


class CommitOutcome(str, enum.Enum):
    """What resolution found out about a COMMIT whose reply was lost."""

    COMMITTED = "committed"
    ABORTED = "aborted"
    NOTHING_TO_COMMIT = "read-only"
    UNKNOWN = "unknown"


class Checker(Protocol):
    """What the resolver needs of its engine (no more: no import cycle with the hooks)."""

    policy: Any
    stats: Stats
    name: str

    def arm(self, dbapi_conn: Any, seconds: float | None = None) -> Any: ...

    def disarm(self, armed: Any) -> str | None: ...

    def sleep(self, seconds: float) -> None: ...

    def abort(self, dbapi_conn: Any) -> None: ...


def verdict_of(exc: BaseException) -> CommitOutcome | None:
    """The resolution verdict attached to a failed COMMIT's exception, if any."""
    orig = getattr(exc, "orig", None)
    found = getattr(exc, _VERDICT_ATTR, None) or getattr(orig, _VERDICT_ATTR, None)
    return found if isinstance(found, CommitOutcome) else None


def _row(dbapi_conn: Any, sql: str) -> Any:
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute(sql)
        return cursor.fetchone()
    finally:
        with contextlib.suppress(Exception):
            cursor.close()


def _one(dbapi_conn: Any, sql: str) -> Any:
    row = _row(dbapi_conn, sql)
    return None if row is None else row[0]


Identity = tuple[str, int, int]  # system identifier, timeline, server_version_num


class _Facts(NamedTuple):
    in_recovery: bool
    identity: Identity | None  # None on a standby, where there is no current WAL position
    started: float  # the server's start (epoch seconds)
    reused_from: int | None  # xids from this one up may have been handed out again (None: any)
    server_pid: int  # the backend's own pid (a pooler in between reports another one)
    system_identifier: str  # the cluster's, standbys included
    checkpoint_timeline: int  # the latest checkpoint's (a standby's: its latest restartpoint's)
    checkpoint_next_xid: int  # and its next xid


def _full_xid(next_xid: object) -> int:
    """A checkpoint's ``next_xid`` ("epoch:xid") as a full 64-bit xid (xid8, txid)."""
    epoch, _, xid = str(next_xid).partition(":")
    return (int(epoch) << 32) | int(xid)


def _facts(dbapi_conn: Any) -> _Facts:
    in_recovery, sysid, walfile, version, started, next_xid, pid, ckpt_tli, ckpt_next = _row(
        dbapi_conn, _FACTS_SQL
    )
    identity = None
    if walfile is not None:  # WAL file names start with the timeline, in hex
        identity = (str(sysid), int(str(walfile)[:8], 16), int(version))
    reused_from = None if next_xid is None else _full_xid(next_xid)
    return _Facts(
        bool(in_recovery),
        identity,
        float(started),
        reused_from,
        int(pid),
        str(sysid),
        int(ckpt_tli),
        _full_xid(ckpt_next),
    )


def _sql_for(identity: Identity) -> tuple[str, str]:
    """The (xid, status) queries for the server of ``identity``."""
    return (_XID_SQL, _STATUS_SQL) if identity[2] >= 130000 else (_XID_SQL_10, _STATUS_SQL_10)


class _NotSameServer(Exception):
    """The server answering is not (provably) the one that assigned the xid."""


class CommitResolver:
    """Per-engine commit verification, used by the engine's ``do_commit`` wrapper.

    :param owner: the engine's state (:class:`Checker`).
    :param creator: makes a new DBAPI connection outside the pool (the pool's creator: same
        connect parameters, retries within :data:`connect_budget`).
    """

    def __init__(self, owner: Checker, creator: Callable[[], Any]) -> None:
        self._owner = owner
        self._creator = creator
        self._warned = False

    def commit(self, dbapi_conn: Any, do_commit: Callable[[Any], None]) -> None:
        """COMMIT on ``dbapi_conn``; resolve the outcome if the connection dies meanwhile."""
        # SQLAlchemy passes its pool proxy; closing *that* would check it in.
        raw = getattr(dbapi_conn, "dbapi_connection", dbapi_conn)
        info = dbapi_conn.info  # the pool proxy's info: the record's
        identity = info.get(_IDENTITY_KEY)
        started = info.get(_STARTED_KEY)
        if identity is None:  # a standby or a server too old to ask: nothing to verify with
            do_commit(dbapi_conn)
            return
        try:
            xid = _one(dbapi_conn, _sql_for(identity)[0])
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
            with contextlib.suppress(Exception):
                raw.close()  # dead anyway; the pool replaces it at the next checkout
            outcome = self._resolve(xid, identity, started)
            self._owner.stats.emit(CommitResolved(self._owner.name, outcome.value))
            if outcome in (CommitOutcome.COMMITTED, CommitOutcome.NOTHING_TO_COMMIT):
                return  # the transaction's work is durable (or there was none)
            with contextlib.suppress(AttributeError):
                setattr(exc, _VERDICT_ATTR, outcome)
            raise

    def on_connect(self, dbapi_conn: Any, record: Any) -> None:
        """Pool ``connect`` listener: record whether the server is in recovery and its
        identity, outside any app transaction. One query per new connection."""
        facts: _Facts | None = None
        try:
            try:
                facts = _facts(dbapi_conn)
            except Exception as exc:
                if classify(exc).connection_unusable:
                    raise
                if not self._warned:  # PostgreSQL < 10, or a pooler that refuses the query
                    self._warned = True
                    logger.warning(
                        "cannot read the server's facts (%s): commits on its connections are "
                        "not verified and 25006 is not recognised as a failover signal",
                        classify(exc).reason,
                    )
            with contextlib.suppress(Exception):
                dbapi_conn.rollback()
        except BaseException:
            # Failed or cancelled: SQLAlchemy drops the new record without closing the connection.
            with contextlib.suppress(Exception):
                self._owner.abort(dbapi_conn)
            raise
        if facts is not None:
            record.info[IN_RECOVERY_KEY] = facts.in_recovery
            record.info[_IDENTITY_KEY] = facts.identity
            record.info[_STARTED_KEY] = facts.started
            record.info[SERVER_PID_KEY] = facts.server_pid
            record.info[SYSTEM_ID_KEY] = facts.system_identifier

    def _resolve(
        self, xid: str | None, identity: Identity | None, started: float | None
    ) -> CommitOutcome:
        if xid is None:
            return CommitOutcome.NOTHING_TO_COMMIT
        if identity is None or started is None or not xid.isdigit():  # xid8::text: digits
            return CommitOutcome.UNKNOWN
        # After crash recovery an xid that never reached the disk is handed out again: then
        # "committed" may be another transaction's, unless the xid provably predates the
        # restart (see _FACTS_SQL). A crash loses our transaction if anything of it was lost,
        # so "aborted" and "in the future" still mean that it did not commit. After a failover
        # likewise, on a promoted server that proves it replayed our timeline (module
        # docstring).
        restarted = untrusted = False
        owner = self._owner
        deadline = time.monotonic() + owner.policy.commit_check_timeout
        conn: Any = None
        wait = 0.02
        attempt = 0
        try:
            while True:
                attempt += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return CommitOutcome.UNKNOWN
                try:
                    if conn is None:
                        conn = self._connect(remaining)
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return CommitOutcome.UNKNOWN
                        below = self._query(conn, remaining, _trust_of, (identity, started))
                        if below is not _SAME_RUN:
                            restarted = True
                            untrusted = untrusted or below is None or int(xid) >= below
                    status = self._query(
                        conn, deadline - time.monotonic(), _status, (_sql_for(identity)[1], xid)
                    )
                except _NotSameServer:
                    return CommitOutcome.UNKNOWN
                except Exception as exc:
                    found = classify(exc)
                    if found.sqlstate == "22023" and "future" in str(exc):
                        # Not assigned since the server restarted: lost in a crash, or unknown.
                        return CommitOutcome.ABORTED if restarted else CommitOutcome.UNKNOWN
                    if found.kind is ErrorKind.PERMANENT:  # e.g. the database was dropped
                        return CommitOutcome.UNKNOWN
                    owner.stats.retry("commit-check", attempt, wait, found)
                    if conn is not None:  # this connection failed: the next poll makes one
                        owner.abort(conn)
                        conn = None
                    status = "unreachable"
                if status == "committed":
                    return CommitOutcome.UNKNOWN if untrusted else CommitOutcome.COMMITTED
                if status == "aborted":
                    return CommitOutcome.ABORTED
                if status not in ("in progress", "unreachable"):
                    return CommitOutcome.UNKNOWN  # NULL: too old to know
                owner.stats.incr("commit-check.polls")
                owner.sleep(min(wait, max(0.0, deadline - time.monotonic())))
                wait = min(wait * 2, 0.5)
        finally:
            if conn is not None:  # whatever happened, cancellation included
                with contextlib.suppress(Exception):
                    owner.abort(conn)

    def _connect(self, budget: float) -> Any:
        token = connect_budget.set(budget)
        try:
            conn = self._creator()
        finally:
            connect_budget.reset(token)
        self._owner.stats.incr("commit-check.connections")
        return conn

    def _query(self, conn: Any, budget: float, run: Callable[[Any, Any], Any], arg: Any) -> Any:
        """``run(conn, arg)`` bounded by the watchdog to ``budget`` seconds."""
        if budget <= 0:
            raise TimeoutError("commit_check_timeout spent")
        key = self._owner.arm(conn, budget)
        try:
            return run(conn, arg)
        finally:
            self._owner.disarm(key)


_SAME_RUN: Any = object()


def _trust_of(conn: Any, known: tuple[Identity, float]) -> Any:
    """How far the server on ``conn`` can answer for an xid assigned by the server of
    ``known`` (identity, start): :data:`_SAME_RUN` if it is that server, not restarted; else
    the xid from which "committed" may be another transaction's (``None``: any), for the same
    server restarted or a promoted server whose latest checkpoint is on our timeline (see the
    module docstring); :class:`_NotSameServer` for any other server."""
    identity, started = known
    facts = _facts(conn)
    with contextlib.suppress(Exception):
        conn.rollback()
    if facts.identity == identity:
        if abs(facts.started - started) < 1e-3:
            return _SAME_RUN
        return facts.reused_from
    if (
        facts.identity is not None
        and facts.identity[0] == identity[0]  # the same cluster
        and facts.identity[2] // 10000 == identity[2] // 10000  # replication: same major
        and facts.identity[1] > identity[1]
        and facts.checkpoint_timeline == identity[1]
    ):
        return facts.checkpoint_next_xid
    raise _NotSameServer


def _status(conn: Any, query: tuple[str, str]) -> str | None:
    sql, xid = query
    status = _one(conn, sql.format(xid))
    with contextlib.suppress(Exception):
        conn.rollback()  # no transaction left open between polls
    return None if status is None else str(status)
