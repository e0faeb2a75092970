"""What differs between the supported drivers, behind one small interface.

Everything else (classification, retries, replay, commit checks) is written once against this.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from dbresilience import _sqla
from dbresilience._classification import Classification, ErrorKind
from dbresilience._errors import ConfigurationError

__all__ = ["SUPPORTED", "Driver", "Position", "driver_for", "tune_socket"]

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

    def apply_network_defaults(
        self, cparams: dict[str, Any], policy: Any, *, budget: float | None = None
    ) -> None:
        """Fill in connect parameters that bound waits, unless the user set them; with a
        ``budget`` (seconds, a commit check's), the connect timeout never exceeds it."""

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

    def backend_pid(self, dbapi_conn: Any) -> int | None:
        """The server process id the connection reported at startup (no I/O); behind a
        pooler it is the pooler's, not a PostgreSQL backend's."""
        return None

    def address(self, dbapi_conn: Any) -> tuple[str, int]:
        """The (host, port) the connection reached (no I/O): one hang monitor per address."""
        raise NotImplementedError

    def canceller(self, dbapi_conn: Any, timeout: float) -> Callable[[], None] | None:
        """A function that asks the server to cancel what ``dbapi_conn`` is running.

        Built without I/O (it may be called while another thread is blocked on the
        connection); the returned function does the I/O, blocks at most ``timeout`` seconds
        and raises nothing. ``None`` when the connection cannot be cancelled.
        """
        return None

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

    def apply_network_defaults(
        self, cparams: dict[str, Any], policy: Any, *, budget: float | None = None
    ) -> None:
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
        if budget is not None:  # libpq's connect_timeout: whole seconds, 2 at least
            limit = max(2, math.ceil(budget))
            with contextlib.suppress(TypeError, ValueError):
                cparams["connect_timeout"] = min(int(cparams["connect_timeout"]), limit)

    @staticmethod
    def _pgconn(dbapi_conn: Any) -> Any:
        pgconn = getattr(dbapi_conn, "pgconn", None)
        if pgconn is None:  # SQLAlchemy's async adapter wraps psycopg.AsyncConnection
            pgconn = dbapi_conn.driver_connection.pgconn
        return pgconn

    needs_watchdog = True  # libpq has no client-side statement timeout

    def fileno(self, dbapi_conn: Any) -> int:
        return int(self._pgconn(dbapi_conn).socket)

    def backend_pid(self, dbapi_conn: Any) -> int | None:
        pid = self._pgconn(dbapi_conn).backend_pid
        return int(pid) if pid else None

    def address(self, dbapi_conn: Any) -> tuple[str, int]:
        pgconn = self._pgconn(dbapi_conn)
        return pgconn.host.decode(), int(pgconn.port.decode() or 5432)

    def canceller(self, dbapi_conn: Any, timeout: float) -> Callable[[], None] | None:
        pgconn = self._pgconn(dbapi_conn)
        if _has_cancel_safe():  # libpq 17+: a cancel connection we can bound
            cancel_conn = pgconn.cancel_conn()
            return lambda: _psycopg_cancel(cancel_conn, timeout)
        legacy = pgconn.get_cancel()  # PQcancel: bounded only by the kernel's connect timeout
        return lambda: _quietly(legacy.cancel)

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
            pgconn = dbapi_conn.driver_connection.pgconn
        # Not PQTRANS_IDLE (a closed connection reports UNKNOWN: whether a transaction was open
        # is lost with it).
        if pgconn.transaction_status != 0:
            return Position.IN_TRANSACTION
        return Position.AUTOCOMMIT if dbapi_conn.autocommit else Position.STARTS_TRANSACTION

    def abort(self, dbapi_conn: Any) -> None:
        self._pgconn(dbapi_conn).finish()


class _Asyncpg(Driver):
    """asyncpg, through SQLAlchemy's ``AsyncAdapt_asyncpg_connection`` (``driver_connection``:
    the ``asyncpg.Connection``, whose private ``_protocol``/``_addr``/``_transport`` give the
    cancel key and the socket).

    asyncpg has no keepalive or ``tcp_user_timeout`` connect options (set on the socket here),
    a 60 s connect timeout and no command timeout by default.
    """

    name = "asyncpg"
    # Policy.command_timeout is enforced by the watchdog, not by asyncpg's command_timeout:
    # that arms an event-loop timer per protocol message, 7-8 % of a checkout + select 1 here.
    needs_watchdog = True

    def apply_network_defaults(
        self, cparams: dict[str, Any], policy: Any, *, budget: float | None = None
    ) -> None:
        cparams.setdefault("timeout", float(policy.connect_timeout))
        if budget is not None:
            with contextlib.suppress(TypeError, ValueError):
                cparams["timeout"] = max(0.1, min(float(cparams["timeout"]), budget))

    def fileno(self, dbapi_conn: Any) -> int:
        sock = _socket_of(dbapi_conn)
        if sock is None:
            raise ConnectionError("connection is closed")
        return int(sock.fileno())

    def backend_pid(self, dbapi_conn: Any) -> int | None:
        pid = dbapi_conn.driver_connection.get_server_pid()
        return int(pid) if pid else None

    def address(self, dbapi_conn: Any) -> tuple[str, int]:
        addr = dbapi_conn.driver_connection._addr
        if isinstance(addr, str):  # a Unix-domain socket path
            return addr, 0
        return str(addr[0]), int(addr[1])

    def canceller(self, dbapi_conn: Any, timeout: float) -> Callable[[], None] | None:
        connection = dbapi_conn.driver_connection
        protocol = connection._protocol
        pid, secret, addr = protocol.backend_pid, protocol.backend_secret, connection._addr
        if not isinstance(pid, int) or not isinstance(secret, int):
            return None
        # asyncpg's own Connection.cancel() needs the event loop; this runs on the watchdog's
        # thread, so send the protocol's CancelRequest message ourselves (plain TCP or Unix).
        message = struct.pack("!iiii", 16, 80877102, pid, secret)
        return lambda: _send_cancel_request(addr, message, timeout)

    def configure(self, dbapi_conn: Any, policy: Any) -> None:
        sock = _socket_of(dbapi_conn)
        if sock is not None:
            tune_socket(sock, policy)

    def refine(self, exc: BaseException, found: Classification) -> Classification:
        # A bare TimeoutError out of a statement is asyncpg's command_timeout, when the app set
        # one (connect_args): it sent a cancel request, like statement_timeout (57014). Not
        # retried; SQLAlchemy discards the connection (TimeoutError is an exit exception).
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):  # distinct before 3.11
            return Classification(ErrorKind.TIMEOUT, None, "asyncpg command_timeout expired")
        return found

    def closed(self, dbapi_conn: Any) -> bool:
        return bool(dbapi_conn.driver_connection.is_closed())

    def looks_dead(self, dbapi_conn: Any) -> bool:
        # asyncpg notices EOF by itself and flips is_closed(), but only once the event loop has
        # read the socket; bytes waiting on an idle socket mean the same thing one step earlier.
        if dbapi_conn.driver_connection.is_closed():
            return True
        sock = _socket_of(dbapi_conn)
        return sock is not None and _readable(sock.fileno())

    def statement_position(self, dbapi_conn: Any) -> Position:
        if _sqla.asyncpg_adapter_transaction(dbapi_conn) is not None:
            return Position.IN_TRANSACTION
        if dbapi_conn.isolation_level == "autocommit":  # the adapter's own test before BEGIN
            # asyncpg's own flag, for a BEGIN sent as a statement; it outlives a connection the
            # server closed. A terminated connection has no protocol left to ask: assume one.
            try:
                in_transaction = dbapi_conn.driver_connection.is_in_transaction()
            except AttributeError:
                return Position.IN_TRANSACTION
            return Position.IN_TRANSACTION if in_transaction else Position.AUTOCOMMIT
        # SQLAlchemy's adapter sends BEGIN with this statement (asyncpg refuses to if a BEGIN
        # was sent behind the adapter's back, so that case never gets to run).
        return Position.STARTS_TRANSACTION

    def abort(self, dbapi_conn: Any) -> None:
        dbapi_conn.driver_connection.terminate()


def tune_socket(sock: Any, policy: Any) -> None:
    """Keepalives and ``TCP_USER_TIMEOUT`` from ``policy`` on a connected TCP socket."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
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


def _has_cancel_safe() -> bool:
    try:
        from psycopg import capabilities  # psycopg 3.2+
    except ImportError:
        return False
    return bool(capabilities.has_cancel_safe())


def _quietly(fn: Callable[[], object]) -> None:
    with contextlib.suppress(Exception):
        fn()


def _psycopg_cancel(cancel_conn: Any, timeout: float) -> None:
    """Drive a libpq cancel connection (``PQcancelCreate``) to its end, within ``timeout``."""
    from psycopg import pq

    deadline = time.monotonic() + timeout
    try:
        cancel_conn.start()
        while True:
            status = cancel_conn.poll()
            remaining = deadline - time.monotonic()
            if status not in (pq.PollingStatus.READING, pq.PollingStatus.WRITING) or remaining <= 0:
                return  # OK, FAILED, or out of time
            fd = cancel_conn.socket
            if status == pq.PollingStatus.READING:
                select.select([fd], [], [], remaining)
            else:
                select.select([], [fd], [], remaining)
    except Exception:
        return
    finally:
        with contextlib.suppress(Exception):
            cancel_conn.finish()


def _send_cancel_request(addr: Any, message: bytes, timeout: float) -> None:
    """Send a CancelRequest to ``addr`` ((host, port) or a Unix socket path) within ``timeout``."""
    try:
        if isinstance(addr, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(addr)
            except OSError:
                sock.close()  # else left to the garbage collector (ResourceWarning)
                raise
        else:
            sock = socket.create_connection(tuple(addr)[:2], timeout=timeout)
        with sock:
            sock.sendall(message)
            with contextlib.suppress(OSError):
                sock.recv(1)  # the server closes the connection once it has read the request
    except OSError:
        return


def _socket_of(dbapi_conn: Any) -> Any:
    transport = getattr(dbapi_conn.driver_connection, "_transport", None)
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
