"""Every use of SQLAlchemy's private API, in one place.

dbresilience hooks into SQLAlchemy where no public hook exists (the pool's creator and
``_do_get``, the connection record a replay reconnects). Each such use is a function here,
and ``tests/test_sqla_private_api.py`` checks each against the installed SQLAlchemy, so that a
change there fails loudly in our tests instead of silently in an application.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import sqlalchemy

__all__ = ["MINIMUM", "check_version", "reapply_characteristics"]

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
