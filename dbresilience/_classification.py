"""Error classification: map driver and OS exceptions to a small taxonomy.

:func:`classify` walks an exception and its explicit causes (SQLAlchemy's ``.orig``,
``__cause__``), reads a SQLSTATE when a driver provides one and otherwise recognises OS errors
and the message texts of libpq, asyncpg and PgBouncer. The taxonomy (kind: retryable? examples):

- ``disconnect`` (retryable): 08000/08003/08006, 57P01/57P02/57P05, 25P03, connection reset,
  broken pipe, SSL EOF, "server closed the connection unexpectedly".
- ``unavailable`` (retryable): connection refused, 08001/08004, 57P03 (starting up, in
  recovery), PgBouncer cannot connect. 25006 (read-only transaction) is an application error
  here: a read-only role or ``SET TRANSACTION READ ONLY`` on a primary; the engine upgrades it
  to ``unavailable`` only when the connection's server was in recovery (a standby, a demoted
  primary), which it records when connecting.
- ``transaction-conflict`` (retryable): 40001, 40P01, 55P03 (lock not available), 55006.
- ``resource-exhausted`` (retryable): 53xxx (53300 too many connections), 58000/58030,
  PgBouncer ``query_wait_timeout`` / ``no more connections allowed``.
- ``timeout`` (not retryable): 57014 (statement_timeout, cancel), PgBouncer ``query_timeout``.
- ``commit-outcome-unknown`` (not retryable): 08007, 40003, a connection lost during COMMIT.
- ``permanent`` (not retryable): 28000/28P01 (authentication), 3D000 (no such database), 57P04.
- ``application`` (not retryable): everything else - constraint violations, syntax errors,
  permissions. These are passed through untouched.

"Retryable" means the *whole transaction* (or the connect) may be run again; whether a given
retry is safe also depends on where the failure happened (see ``_transactions``). Messages are
matched on the English texts; SQLSTATEs work whatever the server's ``lc_messages``.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import ssl
from dataclasses import dataclass

__all__ = ["Classification", "ErrorKind", "classify", "from_database"]


class ErrorKind(str, enum.Enum):
    """The classes of failure dbresilience tells apart."""

    DISCONNECT = "disconnect"
    UNAVAILABLE = "unavailable"
    TRANSACTION_CONFLICT = "transaction-conflict"
    RESOURCE_EXHAUSTED = "resource-exhausted"
    TIMEOUT = "timeout"
    COMMIT_OUTCOME_UNKNOWN = "commit-outcome-unknown"
    PERMANENT = "permanent"
    APPLICATION = "application"


_RETRYABLE = frozenset(
    {
        ErrorKind.DISCONNECT,
        ErrorKind.UNAVAILABLE,
        ErrorKind.TRANSACTION_CONFLICT,
        ErrorKind.RESOURCE_EXHAUSTED,
    }
)
# Kinds after which the connection must never be used again.
_CONNECTION_UNUSABLE = frozenset(
    {ErrorKind.DISCONNECT, ErrorKind.UNAVAILABLE, ErrorKind.COMMIT_OUTCOME_UNKNOWN}
)


@dataclass(frozen=True, slots=True)
class Classification:
    """What :func:`classify` found.

    :ivar kind: the taxonomy class.
    :ivar sqlstate: the five-character SQLSTATE when one was available, else ``None``.
    :ivar reason: a short, secret-free explanation (the rule that matched).
    """

    kind: ErrorKind
    sqlstate: str | None = None
    reason: str = ""

    @property
    def retryable(self) -> bool:
        """True when running the transaction (or the connect) again may succeed."""
        return self.kind in _RETRYABLE

    @property
    def connection_unusable(self) -> bool:
        """True when the connection that raised this must be discarded."""
        return self.kind in _CONNECTION_UNUSABLE


# SQLSTATE -> kind. Exact codes first, then two-character classes.
_SQLSTATE_EXACT: dict[str, ErrorKind] = {
    "08001": ErrorKind.UNAVAILABLE,
    "08004": ErrorKind.UNAVAILABLE,
    "08007": ErrorKind.COMMIT_OUTCOME_UNKNOWN,
    "40001": ErrorKind.TRANSACTION_CONFLICT,
    "40P01": ErrorKind.TRANSACTION_CONFLICT,
    "40003": ErrorKind.COMMIT_OUTCOME_UNKNOWN,
    "55P03": ErrorKind.TRANSACTION_CONFLICT,
    "55006": ErrorKind.TRANSACTION_CONFLICT,
    "57P01": ErrorKind.DISCONNECT,  # pg_terminate_backend *or* fast shutdown
    "57P02": ErrorKind.DISCONNECT,  # crash of another backend: all sessions killed
    "57P03": ErrorKind.UNAVAILABLE,
    "57P04": ErrorKind.PERMANENT,
    "57P05": ErrorKind.DISCONNECT,
    "57014": ErrorKind.TIMEOUT,
    "25P03": ErrorKind.DISCONNECT,
    "58000": ErrorKind.RESOURCE_EXHAUSTED,
    "58030": ErrorKind.RESOURCE_EXHAUSTED,
    "3D000": ErrorKind.PERMANENT,
}
_SQLSTATE_CLASS: dict[str, ErrorKind] = {
    "08": ErrorKind.DISCONNECT,
    "53": ErrorKind.RESOURCE_EXHAUSTED,
    "28": ErrorKind.PERMANENT,
}

# PgBouncer reports every pooler error as 08P01 (asyncpg: 08003 when PgBouncer also closed the
# connection, the 08P01 text appended); tell them apart by text (src/proto.c).
_PGBOUNCER_MESSAGES: tuple[tuple[str, ErrorKind], ...] = (
    ("query_wait_timeout", ErrorKind.RESOURCE_EXHAUSTED),
    ("no more connections allowed", ErrorKind.RESOURCE_EXHAUSTED),
    ("pgbouncer cannot connect to server", ErrorKind.UNAVAILABLE),
    ("server login has been failing", ErrorKind.UNAVAILABLE),
    ("server_login_retry", ErrorKind.UNAVAILABLE),
    ("database shutting down", ErrorKind.UNAVAILABLE),
    ("pgbouncer is shutting down", ErrorKind.UNAVAILABLE),
    ("server conn crashed", ErrorKind.DISCONNECT),
    ("client_idle_timeout", ErrorKind.DISCONNECT),
    ("idle transaction timeout", ErrorKind.DISCONNECT),
    ("client_login_timeout", ErrorKind.UNAVAILABLE),
    ("query_timeout", ErrorKind.TIMEOUT),
    ("no such user", ErrorKind.PERMANENT),
    ("no such database", ErrorKind.PERMANENT),
    ("password authentication failed", ErrorKind.PERMANENT),
)

# libpq / psycopg / asyncpg texts for failures that carry no SQLSTATE. Order matters: the
# permanent connect failures are checked before the generic "connection failed".
_MESSAGES: tuple[tuple[str, ErrorKind], ...] = (
    ("password authentication failed", ErrorKind.PERMANENT),
    ("no password supplied", ErrorKind.PERMANENT),
    ("authentication failed", ErrorKind.PERMANENT),
    ("no pg_hba.conf entry", ErrorKind.PERMANENT),
    ("does not exist", ErrorKind.PERMANENT),  # role / database "x" does not exist
    ("invalid connection option", ErrorKind.PERMANENT),
    ("invalid dsn", ErrorKind.PERMANENT),
    ("too many connections", ErrorKind.RESOURCE_EXHAUSTED),
    ("too many clients", ErrorKind.RESOURCE_EXHAUSTED),
    ("remaining connection slots are reserved", ErrorKind.RESOURCE_EXHAUSTED),
    ("the database system is starting up", ErrorKind.UNAVAILABLE),
    ("the database system is shutting down", ErrorKind.UNAVAILABLE),
    ("the database system is in recovery mode", ErrorKind.UNAVAILABLE),
    ("not yet accepting connections", ErrorKind.UNAVAILABLE),
    ("connection refused", ErrorKind.UNAVAILABLE),
    ("could not translate host name", ErrorKind.UNAVAILABLE),
    ("connection timeout expired", ErrorKind.UNAVAILABLE),
    ("timeout expired", ErrorKind.UNAVAILABLE),
    ("connect call failed", ErrorKind.UNAVAILABLE),
    ("server closed the connection unexpectedly", ErrorKind.DISCONNECT),
    ("terminating connection", ErrorKind.DISCONNECT),
    ("connection was closed in the middle of operation", ErrorKind.DISCONNECT),
    ("consuming input failed", ErrorKind.DISCONNECT),
    ("sending query failed", ErrorKind.DISCONNECT),
    ("could not receive data from server", ErrorKind.DISCONNECT),
    ("could not send data to server", ErrorKind.DISCONNECT),
    ("ssl connection has been closed unexpectedly", ErrorKind.DISCONNECT),
    ("ssl syscall error", ErrorKind.DISCONNECT),
    ("lost synchronization with server", ErrorKind.DISCONNECT),
    # asyncpg, using a connection whose server has sent FATAL (state 2: discarding input after
    # an unsolicited error) and whose EOF is not read yet, or is read ("failed" state).
    ("another operation (2) is in progress", ErrorKind.DISCONNECT),
    ('protocol is in the "failed" state', ErrorKind.DISCONNECT),
    ("connection is closed", ErrorKind.DISCONNECT),
    ("connection is lost", ErrorKind.DISCONNECT),
    ("connection socket closed", ErrorKind.DISCONNECT),  # psycopg's waiting.py
    ("connection reset", ErrorKind.DISCONNECT),
    ("broken pipe", ErrorKind.DISCONNECT),
    ("connection failed", ErrorKind.UNAVAILABLE),
    ("could not connect to server", ErrorKind.UNAVAILABLE),
)

_MAX_CHAIN = 8


def _sqlstate_of(exc: BaseException) -> str | None:
    for attr in ("sqlstate", "pgcode"):
        value = getattr(exc, attr, None)
        if isinstance(value, str) and len(value) == 5:
            return value
    return None


def _from_sqlstate(sqlstate: str, message: str) -> Classification:
    if sqlstate.startswith("08"):
        # PgBouncer's own 08P01, or asyncpg's 08003 for the connection PgBouncer closed after
        # it ("connection was closed in the middle of operation: server login has been
        # failing..."): the pooler's text says what happened, whatever the code on top.
        lowered = message.lower()
        for needle, kind in _PGBOUNCER_MESSAGES:
            if needle in lowered:
                return Classification(kind, sqlstate, f"pgbouncer: {needle}")
    if sqlstate == "08P01":
        return Classification(ErrorKind.DISCONNECT, sqlstate, "protocol violation")
    exact = _SQLSTATE_EXACT.get(sqlstate)
    if exact is not None:
        return Classification(exact, sqlstate, f"sqlstate {sqlstate}")
    by_class = _SQLSTATE_CLASS.get(sqlstate[:2])
    if by_class is not None:
        return Classification(by_class, sqlstate, f"sqlstate class {sqlstate[:2]}")
    return Classification(ErrorKind.APPLICATION, sqlstate, f"sqlstate {sqlstate}")


def _from_os_error(exc: OSError) -> Classification:
    if isinstance(exc, ConnectionRefusedError):
        return Classification(ErrorKind.UNAVAILABLE, None, "connection refused")
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        # asyncpg raises ConnectionResetError("Connect call failed") while connecting.
        if "connect call failed" in str(exc).lower():
            return Classification(ErrorKind.UNAVAILABLE, None, "connect call failed")
        return Classification(ErrorKind.DISCONNECT, None, type(exc).__name__)
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return Classification(ErrorKind.DISCONNECT, None, "ssl eof")
    if isinstance(exc, socket.gaierror):
        return Classification(ErrorKind.UNAVAILABLE, None, "name resolution failed")
    if isinstance(exc, TimeoutError):
        return Classification(ErrorKind.DISCONNECT, None, "socket timeout")
    return Classification(ErrorKind.UNAVAILABLE, None, f"os error {exc.errno}")


# Server messages whose SQLSTATE some driver versions drop (psycopg 3.1 reports a FATAL that
# arrives with the connection's end as a plain OperationalError, with only the text).
_MESSAGE_SQLSTATES: tuple[tuple[str, str], ...] = (
    ("terminating connection due to administrator command", "57P01"),
    ("terminating connection due to crash of another server process", "57P02"),
    ("terminating connection due to idle-in-transaction timeout", "25P03"),
    ("terminating connection due to idle-session timeout", "57P05"),
)


def _from_message(message: str) -> Classification | None:
    lowered = message.lower()
    for needle, sqlstate in _MESSAGE_SQLSTATES:
        if needle in lowered:
            return _from_sqlstate(sqlstate, message)
    for needle, kind in _MESSAGES:
        if needle in lowered:
            return Classification(kind, None, needle)
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(seen) < _MAX_CHAIN and current not in seen:
        seen.append(current)
        orig = getattr(current, "orig", None)
        if isinstance(orig, BaseException) and orig is not current:
            current = orig
        else:
            # Explicit causes only: __context__ would be whatever was being handled when this
            # was raised (a retry's previous failure), not what caused it.
            current = current.__cause__
    return seen


# Top-level packages whose exceptions come from the database side of a call.
_DATABASE_PACKAGES = frozenset({"psycopg", "asyncpg", "sqlalchemy", "dbresilience"})


def from_database(exc: BaseException) -> bool:
    """True when ``exc`` was raised by the driver, SQLAlchemy or dbresilience, or is chained
    (``raise ... from``, ``.orig``) from such an exception.

    Retry loops ask this first: an application's own ``TimeoutError`` (an HTTP call) or
    ``ConnectionRefusedError`` (Redis) says nothing about the database and is never retried.
    """
    for e in _chain(exc):
        if type(e).__module__.partition(".")[0] not in _DATABASE_PACKAGES:
            continue
        if _is_statement_wrapper(e):
            continue  # SQLAlchemy wrapped what its .orig says (a TypeDecorator's own error...)
        return True
    return False


def _is_statement_wrapper(e: BaseException) -> bool:
    """A SQLAlchemy ``StatementError`` that is not a ``DBAPIError``: it only carries ``.orig``."""
    from sqlalchemy import exc as sa_exc

    return isinstance(e, sa_exc.StatementError) and not isinstance(e, sa_exc.DBAPIError)


def classify(exc: BaseException) -> Classification:
    """Classify ``exc`` (a SQLAlchemy, driver or OS exception) into the taxonomy.

    Pure function: no I/O, no side effects. Exceptions classified by an earlier call (our own
    :class:`~dbresilience.ResilienceError` subclasses) keep their classification.
    """
    chain = _chain(exc)
    for e in chain:
        known = getattr(e, "classification", None)
        if isinstance(known, Classification):
            return known
    for e in chain:
        sqlstate = _sqlstate_of(e)
        if sqlstate is not None:
            return _from_sqlstate(sqlstate, str(e))
    for e in chain:
        if isinstance(e, OSError) and type(e).__module__ in ("builtins", "ssl", "socket"):
            return _from_os_error(e)
        if isinstance(e, asyncio.TimeoutError):  # not an OSError before Python 3.11
            return Classification(ErrorKind.DISCONNECT, None, "socket timeout")
    for e in chain:
        found = _from_message(str(e))
        if found is not None:
            return found
    return Classification(ErrorKind.APPLICATION, None, type(chain[-1]).__name__)
