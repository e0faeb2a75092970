"""Every use of SQLAlchemy's private API, in one place.

dbresilience hooks into SQLAlchemy where no public hook exists (the pool's creator and
``_do_get``, the connection record a replay reconnects). Each such use is a function here,
and ``tests/test_sqla_private_api.py`` checks each against the installed SQLAlchemy, so that a
change there fails loudly in our tests instead of silently in an application.
"""

from __future__ import annotations

import functools
import operator
import re
import warnings
from collections.abc import Callable
from typing import Any

import sqlalchemy
from sqlalchemy.engine import URL
from sqlalchemy.engine.interfaces import DBAPIConnection, Dialect
from sqlalchemy.pool import ConnectionPoolEntry, Pool

__all__ = [
    "MINIMUM",
    "asyncpg_adapter_transaction",
    "check_version",
    "checkin_failed",
    "dialect_class",
    "fairy_of_context",
    "finalize_callbacks",
    "invalidate_all",
    "invalidate_older",
    "invoke_creator",
    "on_recreate",
    "plugin_is_async",
    "pool_creator",
    "reapply_characteristics",
    "record_of",
    "set_pool_creator",
    "wrap_do_get",
]

#: The oldest SQLAlchemy dbresilience supports (``async_creator``; CI tests it).
MINIMUM = (2, 0, 16)
_BELOW = (2, 2)  # not yet known to keep the private names used here


def check_version(version: str = sqlalchemy.__version__) -> None:
    """Refuse a SQLAlchemy older than :data:`MINIMUM`; warn (once) about one not yet known."""
    from dbresilience._errors import ConfigurationError

    found = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
    if found < MINIMUM:
        raise ConfigurationError(
            f"dbresilience needs SQLAlchemy >= {'.'.join(map(str, MINIMUM))}, found {version}"
        )
    if found[:2] >= _BELOW:
        warnings.warn(
            f"dbresilience is tested with SQLAlchemy 2.0.16 to 2.1.x, not {version}",
            RuntimeWarning,
            stacklevel=3,
        )


# -- the pool ---------------------------------------------------------------------------------


def pool_creator(pool: Pool) -> Any:
    """The creator the pool was given (``Pool._creator``)."""
    return pool._creator


def invoke_creator(pool: Pool) -> Callable[[ConnectionPoolEntry | None], DBAPIConnection]:
    """Make a new DBAPI connection the way ``pool`` does, outside it
    (``Pool._invoke_creator``: the creator adapted to take the connection record)."""
    return pool._invoke_creator  # type: ignore[return-value]


def set_pool_creator(pool: Pool, creator: Callable[..., DBAPIConnection]) -> None:
    """Replace the pool's creator (the ``Pool._creator`` setter also re-derives
    ``_invoke_creator``; ``Pool.recreate()`` hands it on to the new pool)."""
    pool._creator = creator


def wrap_do_get(pool: Pool, wrapper: Callable[[Callable[[], ConnectionPoolEntry]], Any]) -> None:
    """Route ``Pool._do_get`` (take a record from the queue, or make one) through
    ``wrapper(original_do_get)`` - a partial: no extra Python frame per checkout."""
    pool._do_get = functools.partial(wrapper, pool._do_get)  # type: ignore[method-assign]


def wrap_do_return_conn(
    pool: Pool, wrapper: Callable[[Callable[[ConnectionPoolEntry], None], ConnectionPoolEntry], Any]
) -> None:
    """Route ``Pool._do_return_conn`` (a checked-in record back into the queue) through
    ``wrapper(original, record)`` - a partial, cheaper than a ``checkin`` listener."""
    pool._do_return_conn = functools.partial(  # type: ignore[method-assign]
        wrapper, pool._do_return_conn
    )


def on_recreate(pool: Pool, callback: Callable[[Pool], None]) -> None:
    """Call ``callback(new_pool)`` for the pools ``pool.recreate()`` makes (``dispose()``)."""
    recreate = pool.recreate

    def _recreate() -> Pool:
        new = recreate()
        callback(new)
        return new

    pool.recreate = _recreate  # type: ignore[method-assign]


def checkin_failed(record: ConnectionPoolEntry, exc: BaseException) -> None:
    """Give ``record`` back to its pool after a failed checkout
    (``_ConnectionRecord._checkin_failed``)."""
    record._checkin_failed(exc, _fairy_was_created=False)  # type: ignore[attr-defined]


def max_overflow(pool: Pool) -> int:
    """``QueuePool``'s ``max_overflow`` (``_max_overflow``; -1: no limit); 0 for other pools."""
    value = getattr(pool, "_max_overflow", 0)
    return value if isinstance(value, int) else 0


def invalidate_older(pool: Pool, context: Any, exc: BaseException) -> None:
    """Invalidate the pool's connections older than the execution's one, as SQLAlchemy does
    for a disconnect (``Pool._invalidate``)."""
    pool._invalidate(fairy_of_context(context), exc, _checkin=False)


def invalidate_all(pool: Pool) -> None:
    """Have every connection the pool holds now replaced at its next checkout (what
    ``Pool._invalidate`` does for a disconnect, without a connection to start from)."""
    pool._invalidate(None, None, _checkin=False)  # type: ignore[arg-type]


# -- one execution ---------------------------------------------------------------------------

#: The pool's proxy (``_ConnectionFairy``) of an execution context's connection
#: (``DefaultExecutionContext._dbapi_connection``). An attrgetter: read on every statement.
fairy_of_context: Callable[[Any], Any] = operator.attrgetter("_dbapi_connection")

#: The transaction SQLAlchemy's asyncpg adapter opened (``AsyncAdapt_asyncpg_connection.
#: _transaction``; ``None`` outside one): read before every statement.
asyncpg_adapter_transaction: Callable[[Any], Any] = operator.attrgetter("_transaction")

#: The ``_ConnectionRecord`` behind a pool proxy (``None`` once detached).
record_of: Callable[[Any], Any] = operator.attrgetter("_connection_record")


def finalize_callbacks(record: Any) -> Any:
    """What SQLAlchemy runs when the record's connection is checked in (the reset of the
    characteristics set for this checkout): ``_ConnectionRecord.finalize_callback``, a deque."""
    return record.finalize_callback


def reapply_characteristics(connection: Any, dbapi_connection: Any) -> None:
    """Set the ``connection``'s characteristics (isolation level, read-only...: execution
    options) on ``dbapi_connection``, a new DBAPI connection swapped in under it.

    ``set_connection_characteristic`` appeared in SQLAlchemy 2.0.30; before it, each
    characteristic had ``set_characteristic`` only.
    """
    dialect = connection.dialect
    options = connection.get_execution_options()
    characteristics = dialect.connection_characteristics
    for name in set(characteristics).intersection(options):
        characteristic = characteristics[name]
        setter = getattr(characteristic, "set_connection_characteristic", None)
        if setter is not None:
            setter(dialect, connection, dbapi_connection, options[name])
        else:
            characteristic.set_characteristic(dialect, dbapi_connection, options[name])


# -- create_engine plugins ----------------------------------------------------------------------


def plugin_is_async(kwargs: dict[str, Any]) -> bool:
    """Whether a ``CreateEnginePlugin`` was given the keyword arguments of
    ``create_async_engine`` (which calls ``create_engine`` with the private ``_is_async=True``,
    seen by the plugin's ``__init__``)."""
    return bool(kwargs.get("_is_async", False))


def dialect_class(url: URL, *, is_async: bool) -> type[Dialect]:
    """The dialect class ``create_engine`` / ``create_async_engine`` would build for ``url``,
    without importing its DBAPI (``URL.get_dialect``'s private ``_is_async``)."""
    return url.get_dialect(_is_async=is_async)
