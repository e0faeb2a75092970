"""What differs between the supported drivers, behind one small interface.

Everything else (classification, retries, replay, commit checks) is written once against this.
"""

from __future__ import annotations

import select
from typing import Any

from dbresilience._errors import ConfigurationError

__all__ = ["SUPPORTED", "Driver", "driver_for"]

SUPPORTED = ("psycopg", "asyncpg")


class Driver:
    """Driver-specific probes on a DBAPI connection (as SQLAlchemy's pool holds it)."""

    name = "?"

    def apply_network_defaults(self, cparams: dict[str, Any], policy: Any) -> None:
        """Fill in connect parameters that bound waits, unless the user set them."""

    def closed(self, dbapi_conn: Any) -> bool:
        """True when the driver already knows the connection is closed or broken (no I/O)."""
        return False

    def looks_dead(self, dbapi_conn: Any) -> bool:
        """Zero-round-trip check: True when the server has (probably) hung up."""
        return False

    def transaction_idle(self, dbapi_conn: Any) -> bool:
        """True when no transaction is open on the server: nothing could commit yet."""
        return False

    def autocommit(self, dbapi_conn: Any) -> bool:
        """True when the connection is in autocommit mode."""
        return bool(getattr(dbapi_conn, "autocommit", False))


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

    def transaction_idle(self, dbapi_conn: Any) -> bool:
        return bool(self._pgconn(dbapi_conn).transaction_status == 0)  # PQTRANS_IDLE


class _Asyncpg(Driver):
    name = "asyncpg"

    def closed(self, dbapi_conn: Any) -> bool:
        return bool(dbapi_conn._connection.is_closed())

    def looks_dead(self, dbapi_conn: Any) -> bool:
        # asyncpg's protocol notices EOF by itself and flips is_closed().
        return bool(dbapi_conn._connection.is_closed())

    def transaction_idle(self, dbapi_conn: Any) -> bool:
        return not dbapi_conn._connection.is_in_transaction()


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
