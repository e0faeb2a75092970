"""What differs between the supported drivers, behind one small interface.

Everything else (classification, retries, replay, commit checks) is written once against this.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import select
import socket
from typing import Any

from dbresilience._classification import Classification, ErrorKind
from dbresilience._errors import ConfigurationError

__all__ = ["SUPPORTED", "Driver", "Position", "driver_for"]

SUPPORTED = ("psycopg", "asyncpg")


class Position(enum.Enum):
    """Where the next statement on a connection stands, as far as replaying it goes."""

    #: A transaction is open on the server: its earlier work dies with the connection.
    IN_TRANSACTION = "in-transaction"
    #: No transaction is open and this statement opens one: nothing can have committed.
    STARTS_TRANSACTION = "starts-transaction"
    #: No transaction is open and the statement commits on its own (autocommit mode).
    AUTOCOMMIT = "autocommit"


class Driver:
    """Driver-specific probes on a DBAPI connection (as SQLAlchemy's pool holds it)."""

    name = "?"

    def apply_network_defaults(self, cparams: dict[str, Any], policy: Any) -> None:
        """Fill in connect parameters that bound waits, unless the user set them."""

    def configure(self, dbapi_conn: Any, policy: Any) -> None:
        """Tune a connection the driver just opened (before the pool sees it)."""

    def refine(self, exc: BaseException, found: Classification) -> Classification:
        """Correct :func:`classify`'s verdict for ``exc`` raised by this driver mid-statement."""
        return found

    def abort(self, dbapi_conn: Any) -> None:
        """Close the connection at once; drivers do it without I/O (safe in a cancelled task)."""
        dbapi_conn.close()

    def fileno(self, dbapi_conn: Any) -> int:
        """The socket's descriptor, for the watchdog (drivers without a timeout of their own)."""
        raise NotImplementedError

    #: Whether blocking calls need :mod:`dbresilience._watchdog` (no client timeout in driver).
    needs_watchdog = False

    def closed(self, dbapi_conn: Any) -> bool:
        """True when the driver already knows the connection is closed or broken (no I/O)."""
        return False

    def looks_dead(self, dbapi_conn: Any) -> bool:
        """Zero-round-trip check: True when the server has (probably) hung up."""
        return False

    def statement_position(self, dbapi_conn: Any) -> Position:
        """Where the next statement stands (no I/O; runs before every statement)."""
        return Position.IN_TRANSACTION


def _readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


class _Psycopg(Driver):
    name = "psycopg"

    def apply_network_defaults(self, cparams: dict[str, Any], policy: Any) -> None:
        defaults = {
            "connect_timeout": int(policy.connect_timeout),
            "keepalives": 1,
            "keepalives_idle": max(1, int(policy.keepalives_idle)),
            "keepalives_interval": max(1, int(policy.keepalives_interval)),
            "keepalives_count": policy.keepalives_count,
            "tcp_user_timeout": int(policy.tcp_user_timeout * 1000),
        }
        for key, value in defaults.items():
            cparams.setdefault(key, value)

    @staticmethod
    def _pgconn(dbapi_conn: Any) -> Any:
        pgconn = getattr(dbapi_conn, "pgconn", None)
        if pgconn is None:  # SQLAlchemy's async adapter wraps psycopg.AsyncConnection
            pgconn = dbapi_conn._connection.pgconn
        return pgconn

    needs_watchdog = True  # libpq has no client-side statement timeout

    def fileno(self, dbapi_conn: Any) -> int:
        return int(self._pgconn(dbapi_conn).socket)

    def closed(self, dbapi_conn: Any) -> bool:
        return bool(self._pgconn(dbapi_conn).status != 0)  # CONNECTION_OK == 0

    def looks_dead(self, dbapi_conn: Any) -> bool:
        pgconn = self._pgconn(dbapi_conn)
        if pgconn.status != 0:  # CONNECTION_OK == 0
            return True
        fd = pgconn.socket
        # An idle connection has nothing to read. Readable means the server sent something
        # on its own: a FATAL error and EOF (terminated, shut down), or rarely a NOTIFY.
        return _readable(fd)

    def statement_position(self, dbapi_conn: Any) -> Position:
        pgconn = getattr(dbapi_conn, "pgconn", None)  # inline _pgconn(): a hot path
        if pgconn is None:
            pgconn = dbapi_conn._connection.pgconn
        # Not PQTRANS_IDLE (a closed connection reports UNKNOWN: whether a transaction was open
        # is lost with it).
        if pgconn.transaction_status != 0:
            return Position.IN_TRANSACTION
        return Position.AUTOCOMMIT if dbapi_conn.autocommit else Position.STARTS_TRANSACTION

    def abort(self, dbapi_conn: Any) -> None:
        self._pgconn(dbapi_conn).finish()


class _Asyncpg(Driver):
    """asyncpg, through SQLAlchemy's ``AsyncAdapt_asyncpg_connection`` (``._connection``).

    asyncpg has no keepalive or ``tcp_user_timeout`` connect options (set on the socket here),
    a 60 s connect timeout and no command timeout by default.
    """

    name = "asyncpg"
    # Policy.command_timeout is enforced by the watchdog, not by asyncpg's command_timeout:
    # that arms an event-loop timer per protocol message, 7-8 % of a checkout + select 1 here.
    needs_watchdog = True

    def apply_network_defaults(self, cparams: dict[str, Any], policy: Any) -> None:
        cparams.setdefault("timeout", float(policy.connect_timeout))

    def fileno(self, dbapi_conn: Any) -> int:
        sock = _socket_of(dbapi_conn)
        if sock is None:
            raise ConnectionError("connection is closed")
        return int(sock.fileno())

    def configure(self, dbapi_conn: Any, policy: Any) -> None:
        sock = _socket_of(dbapi_conn)
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return  # Unix-domain socket: no TCP to tune
        tcp = socket.IPPROTO_TCP
        options = (
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (tcp, getattr(socket, "TCP_KEEPIDLE", None), policy.keepalives_idle),
            (tcp, getattr(socket, "TCP_KEEPINTVL", None), policy.keepalives_interval),
            (tcp, getattr(socket, "TCP_KEEPCNT", None), policy.keepalives_count),
            # Linux only; milliseconds
            (tcp, getattr(socket, "TCP_USER_TIMEOUT", None), policy.tcp_user_timeout * 1000),
        )
        for level, option, value in options:
            if option is not None:
                with contextlib.suppress(OSError):  # an option this kernel lacks
                    sock.setsockopt(level, option, max(1, int(value)))

    def refine(self, exc: BaseException, found: Classification) -> Classification:
        # A bare TimeoutError out of a statement is asyncpg's command_timeout, when the app set
        # one (connect_args): it sent a cancel request, like statement_timeout (57014). Not
        # retried; SQLAlchemy discards the connection (TimeoutError is an exit exception).
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):  # distinct before 3.11
            return Classification(ErrorKind.TIMEOUT, None, "asyncpg command_timeout expired")
        return found

    def closed(self, dbapi_conn: Any) -> bool:
        return bool(dbapi_conn._connection.is_closed())

    def looks_dead(self, dbapi_conn: Any) -> bool:
        # asyncpg notices EOF by itself and flips is_closed(), but only once the event loop has
        # read the socket; bytes waiting on an idle socket mean the same thing one step earlier.
        if dbapi_conn._connection.is_closed():
            return True
        sock = _socket_of(dbapi_conn)
        return sock is not None and _readable(sock.fileno())

    def statement_position(self, dbapi_conn: Any) -> Position:
        if dbapi_conn._transaction is not None:
            return Position.IN_TRANSACTION
        if dbapi_conn.isolation_level == "autocommit":  # the adapter's own test before BEGIN
            # asyncpg's own flag, for a BEGIN sent as a statement; it outlives a connection the
            # server closed. A terminated connection has no protocol left to ask: assume one.
            try:
                in_transaction = dbapi_conn._connection.is_in_transaction()
            except AttributeError:
                return Position.IN_TRANSACTION
            return Position.IN_TRANSACTION if in_transaction else Position.AUTOCOMMIT
        # SQLAlchemy's adapter sends BEGIN with this statement (asyncpg refuses to if a BEGIN
        # was sent behind the adapter's back, so that case never gets to run).
        return Position.STARTS_TRANSACTION

    def abort(self, dbapi_conn: Any) -> None:
        dbapi_conn._connection.terminate()


def _socket_of(dbapi_conn: Any) -> Any:
    transport = getattr(dbapi_conn._connection, "_transport", None)
    return None if transport is None else transport.get_extra_info("socket")


_DRIVERS: dict[str, Driver] = {"psycopg": _Psycopg(), "asyncpg": _Asyncpg()}


def driver_for(name: str) -> Driver:
    """The :class:`Driver` for a SQLAlchemy driver name; ``ValueError`` if unsupported."""
    try:
        return _DRIVERS[name]
    except KeyError:
        raise ConfigurationError(
            f"unsupported PostgreSQL driver {name!r}: dbresilience supports "
            "postgresql+psycopg:// and postgresql+asyncpg://"
        ) from None
