"""The exceptions dbresilience raises.

Every error we raise is *both* one of ours and the SQLAlchemy exception the application would
have got without us, so existing ``except sqlalchemy.exc.OperationalError`` clauses keep
working. The driver's exception stays available as ``.orig`` and ``__cause__``::

    ConfigurationError                    bad URL / driver / policy (ValueError, ArgumentError)

    ResilienceError                       (mixin base; .classification)
    ├── DisconnectError                   connection lost: 57P01, reset, EOF...
    ├── DatabaseUnavailable               cannot connect: refused, 57P03, 25006
    │   └── CircuitOpen                   failing fast while the circuit breaker is open
    ├── TransactionConflict               40001, 40P01, 55P03
    ├── ResourceExhausted                 53xxx, PgBouncer query_wait_timeout
    ├── StatementTimeout                  57014
    ├── CommitOutcomeUnknown              COMMIT sent, outcome could not be verified
    └── PermanentError                    auth failure, no such database

A raised instance is of a class combining one of these with a SQLAlchemy class, for example
``DisconnectError`` + :class:`sqlalchemy.exc.OperationalError`; see :func:`wrap`.
Errors of kind ``application`` (constraint violations, syntax...) are never wrapped.

Every error pickles (multiprocessing, task queues) and unpickles to the very same class, with
its ``.orig``, ``classification``, ``retry_after`` and other attributes.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar, cast

from sqlalchemy import exc as sa_exc

from dbresilience._classification import Classification, ErrorKind, classify

__all__ = [
    "CircuitOpen",
    "CommitOutcomeUnknown",
    "ConfigurationError",
    "DatabaseUnavailable",
    "DisconnectError",
    "PermanentError",
    "ResilienceError",
    "ResourceExhausted",
    "StatementTimeout",
    "TransactionConflict",
    "error_class_for",
    "error_from",
    "make_error",
    "wrap",
]


class ConfigurationError(ValueError, sa_exc.ArgumentError):
    """Bad input to dbresilience: URL, driver, policy or engine. Names the problem."""


class ResilienceError(Exception):
    """Base of every dbresilience error; carries the :class:`Classification`."""

    kind: ClassVar[ErrorKind]
    classification: Classification

    @property
    def retryable(self) -> bool:
        """Whether the failed unit of work may be run again."""
        return self.classification.retryable

    @property
    def sqlstate(self) -> str | None:
        """SQLSTATE of the underlying server error, if any."""
        return self.classification.sqlstate

    def __reduce__(self) -> str | tuple[Any, ...]:
        # The combined classes are made at run time: pickle, looking one up by its name, would
        # find the mixin. Rebuild it through error_class_for() instead, then every attribute.
        if not isinstance(self, sa_exc.DBAPIError):
            return super().__reduce__()  # a bare mixin instance: an importable class
        _, args, _ = cast("tuple[Any, ...]", sa_exc.DBAPIError.__reduce__(self))
        state = dict(self.__dict__)
        cls = type(self)
        ours = next((c for c in cls.__mro__ if c in _OURS), None)
        theirs = next(
            (
                c
                for c in cls.__mro__
                if issubclass(c, sa_exc.DBAPIError) and not issubclass(c, ResilienceError)
            ),
            None,
        )
        if ours is None or theirs is None or _combined.get((ours, theirs)) is not cls:
            return cls, args, state  # not made by error_class_for(): importable by name
        chained = self.__cause__ is not None and self.__cause__ is self.orig
        return _rebuild, (ours, theirs, args, state, chained)


class DisconnectError(ResilienceError):
    """The connection was lost; the transaction in flight is gone (it did not commit)."""

    kind = ErrorKind.DISCONNECT


class DatabaseUnavailable(ResilienceError):
    """No usable server: refused, starting up, in recovery, or read-only after a failover."""

    kind = ErrorKind.UNAVAILABLE


class CircuitOpen(DatabaseUnavailable):
    """The engine's circuit breaker is open: failing fast without touching the network."""


class TransactionConflict(ResilienceError):
    """Serialization failure, deadlock or lock timeout: run the whole transaction again."""

    kind = ErrorKind.TRANSACTION_CONFLICT


class ResourceExhausted(ResilienceError):
    """The server (or PgBouncer) is out of connections, memory or disk: back off."""

    kind = ErrorKind.RESOURCE_EXHAUSTED


class StatementTimeout(ResilienceError):
    """The statement was cancelled (statement_timeout or a cancel request)."""

    kind = ErrorKind.TIMEOUT


class CommitOutcomeUnknown(ResilienceError):
    """COMMIT was sent but the connection died and the outcome could not be verified.

    The transaction may or may not have committed. It was *not* run again.
    """

    kind = ErrorKind.COMMIT_OUTCOME_UNKNOWN


class PermanentError(ResilienceError):
    """A failure retrying cannot fix: bad credentials, missing database, dropped database."""

    kind = ErrorKind.PERMANENT


_BY_KIND: dict[ErrorKind, type[ResilienceError]] = {
    cls.kind: cls
    for cls in (
        DisconnectError,
        DatabaseUnavailable,
        TransactionConflict,
        ResourceExhausted,
        StatementTimeout,
        CommitOutcomeUnknown,
        PermanentError,
    )
}


# The classes error_class_for() combines with SQLAlchemy's.
_OURS = frozenset((*_BY_KIND.values(), CircuitOpen))

_combined: dict[tuple[type[ResilienceError], type[sa_exc.DBAPIError]], type[Any]] = {}
_combined_lock = threading.Lock()


def error_class_for(ours: type[ResilienceError], theirs: type[sa_exc.DBAPIError]) -> type[Any]:
    """The class combining ``ours`` with SQLAlchemy's ``theirs`` (made once per pair)."""
    key = (ours, theirs)
    cls = _combined.get(key)
    if cls is None:
        with _combined_lock:
            cls = _combined.get(key)
            if cls is None:
                name = ours.__name__
                cls = type(
                    name, (ours, theirs), {"__module__": "dbresilience", "__qualname__": name}
                )
                _combined[key] = cls
    return cls


def _rebuild(
    ours: type[ResilienceError],
    theirs: type[sa_exc.DBAPIError],
    args: tuple[Any, ...],
    state: dict[str, Any],
    chained: bool,
) -> sa_exc.DBAPIError:
    """Unpickle one of our errors: ``args`` are :class:`~sqlalchemy.exc.DBAPIError`'s."""
    error: sa_exc.DBAPIError = error_class_for(ours, theirs)(*args)
    error.__dict__.update(state)
    if chained:
        error.__cause__ = error.orig  # as raised: ``raise ... from orig``
    return error


def wrap(
    error: sa_exc.DBAPIError,
    classification: Classification | None = None,
    *,
    ours: type[ResilienceError] | None = None,
    connection_invalidated: bool | None = None,
) -> sa_exc.DBAPIError:
    """Return ``error`` re-made as a dbresilience error of its kind, or ``error`` itself.

    The result is an instance of ``type(error)`` *and* of the dbresilience class for its kind.
    asyncpg's errors reach SQLAlchemy as the generic :class:`~sqlalchemy.exc.DBAPIError`; those
    become :class:`~sqlalchemy.exc.OperationalError` (a subclass), as psycopg's are, so
    ``except OperationalError`` catches a lost connection whatever the driver.
    Application errors (and errors already wrapped) are returned unchanged.
    """
    if isinstance(error, ResilienceError):
        return error
    found = classification or classify(error)
    if ours is None:
        if found.kind is ErrorKind.APPLICATION:
            return error
        ours = _BY_KIND[found.kind]
    theirs = type(error)
    if theirs is sa_exc.DBAPIError:
        theirs = sa_exc.OperationalError
    cls = error_class_for(ours, theirs)
    new: sa_exc.DBAPIError = cls(
        error.statement,
        error.params,
        error.orig,
        hide_parameters=error.hide_parameters,
        connection_invalidated=(
            error.connection_invalidated
            if connection_invalidated is None
            else connection_invalidated
        ),
        code=error.code,
        ismulti=error.ismulti,
    )
    new.classification = found  # type: ignore[attr-defined]
    return new


def make_error(
    ours: type[ResilienceError],
    message: str,
    classification: Classification,
    *,
    base: type[sa_exc.DBAPIError] = sa_exc.OperationalError,
    cause: BaseException | None = None,
    statement: str | None = None,
    connection_invalidated: bool = False,
) -> sa_exc.DBAPIError:
    """Build one of our errors that did not come from a DBAPI exception.

    For example circuit open, or a bare ``OSError``/``TimeoutError`` that asyncpg raised
    without SQLAlchemy wrapping it (then ``cause`` is that exception, kept as ``.orig``).
    """
    orig = cause if isinstance(cause, Exception) else _Reason(message)
    cls = error_class_for(ours, base)
    new: sa_exc.DBAPIError = cls(
        statement, None, orig, code=None, connection_invalidated=connection_invalidated
    )
    if not isinstance(orig, _Reason):
        new.add_detail(message)
    new.classification = classification  # type: ignore[attr-defined]
    return new


def error_from(
    exc: Exception,
    classification: Classification,
    *,
    statement: str | None = None,
    connection_invalidated: bool = False,
) -> sa_exc.DBAPIError:
    """Our error (an :class:`~sqlalchemy.exc.OperationalError`) for a non-DBAPI exception.

    asyncpg lets some failures escape SQLAlchemy unwrapped: ``OSError`` while connecting
    (``ConnectionRefusedError: Connect call failed``), ``TimeoutError`` (connect timeout,
    ``command_timeout``). They are re-raised as ours, with ``exc`` as ``.orig``/``__cause__``.
    """
    return make_error(
        _BY_KIND[classification.kind],
        f"dbresilience: {classification.kind.value} ({classification.reason})",
        classification,
        cause=exc,
        statement=statement,
        connection_invalidated=connection_invalidated,
    )


class _Reason(Exception):
    """Stands in as ``.orig`` for errors dbresilience raises without a driver error."""

    __module__ = "dbresilience"  # in the error's message: "(dbresilience._Reason) ..."

    def __reduce__(self) -> tuple[Any, ...]:
        # Not importable by that name: unpickle through this module.
        return _reason, self.args, self.__dict__


def _reason(*args: Any) -> _Reason:
    """Unpickle a :class:`_Reason`."""
    return _Reason(*args)
