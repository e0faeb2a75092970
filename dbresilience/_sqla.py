"""Every use of SQLAlchemy's private API, in one place.

dbresilience hooks into SQLAlchemy where no public hook exists (the pool's creator and
``_do_get``, the connection record a replay reconnects). Each such use is a function here,
and ``tests/test_sqla_private_api.py`` checks each against the installed SQLAlchemy, so that a
change there fails loudly in our tests instead of silently in an application.
"""

from __future__ import annotations

from typing import Any

__all__ = ["reapply_characteristics"]


def reapply_characteristics(connection: Any, dbapi_connection: Any) -> None:
    """Set the ``connection``'s characteristics (isolation level, read-only...: execution
    options) on ``dbapi_connection``, a new DBAPI connection swapped in under it.

    ``set_connection_characteristic`` appeared in SQLAlchemy 2.0.30; before it, each
    characteristic had ``set_characteristic`` only.
    """
    dialect = connection.dialect
    options = connection._execution_options
    characteristics = dialect.connection_characteristics
    for name in set(characteristics).intersection(options):
        characteristic = characteristics[name]
        setter = getattr(characteristic, "set_connection_characteristic", None)
        if setter is not None:
            setter(dialect, connection, dbapi_connection, options[name])
        else:
            characteristic.set_characteristic(dialect, dbapi_connection, options[name])
