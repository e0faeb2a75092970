"""What a resilient engine tells the application: typed events and the hooks that receive them.

Every event is a frozen dataclass whose first field, ``engine``, is the engine's secret-free
name (its URL with the password masked). The union :data:`Event` is what an
:class:`EventHook` receives::

    Event
    ├── RetryDetails        a connect, statement, transaction or commit check runs again
    ├── ConnectFailure      one connect attempt failed
    ├── Disconnect          a connection was found lost (reset, killed backend, restart...)
    ├── Invalidation        one connection, or the whole pool, thrown away
    ├── Replay              a transaction's first statement run again on a new connection
    ├── CommitResolved      a COMMIT whose reply was lost, resolved by asking the server
    ├── BreakerTransition   the circuit breaker opened, let a probe through, or closed
    ├── HangAbort           the hang monitor aborted a call (dead link, hung host)
    └── StatementTimedOut   a statement cut off at ``command_timeout`` / the transaction deadline

Hooks are registered for every engine (:func:`add_event_hook`) or for one
(``add_event_hook(hook, engine=engine)``); they run synchronously on the thread (or event
loop) that saw the event, must be quick, and must not raise (an exception is logged and
dropped). Events only happen on failure paths: the happy path dispatches nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from dbresilience._classification import Classification

__all__ = [
    "BreakerTransition",
    "CommitResolved",
    "ConnectFailure",
    "Disconnect",
    "Event",
    "EventHook",
    "HangAbort",
    "Invalidation",
    "Replay",
    "RetryDetails",
    "StatementTimedOut",
]

RetryWhat = Literal["connect", "statement", "transaction", "commit-check"]


@dataclass(frozen=True, slots=True)
class RetryDetails:
    """One retry about to happen.

    :ivar what: what is retried: ``"connect"``, ``"statement"`` (first-statement replay),
        ``"transaction"`` or ``"commit-check"``.
    :ivar attempt: the attempt that just failed, starting at 1.
    :ivar wait: seconds slept before the next attempt.
    :ivar classification: why the attempt failed (kind, SQLSTATE, reason).
    :ivar engine: the engine's name, password masked.
    """

    what: str
    attempt: int
    wait: float
    classification: Classification
    engine: str


@dataclass(frozen=True, slots=True)
class ConnectFailure:
    """One connect attempt failed (retried or not: see :class:`RetryDetails`)."""

    engine: str
    classification: Classification


@dataclass(frozen=True, slots=True)
class Disconnect:
    """A connection in use was found lost; SQLAlchemy invalidates it."""

    engine: str
    classification: Classification


@dataclass(frozen=True, slots=True)
class Invalidation:
    """Connections thrown away.

    :ivar scope: ``"connection"`` (one) or ``"pool"`` (every connection older than now: they
        are replaced at their next checkout).
    :ivar reason: why, e.g. ``"dead at checkout"``, ``"disconnect"``, ``"host-hung"``.
    """

    engine: str
    scope: Literal["connection", "pool"]
    reason: str


@dataclass(frozen=True, slots=True)
class Replay:
    """The first statement of a transaction ran again on a new connection (nothing of the
    transaction had run on the dead one)."""

    engine: str
    classification: Classification


@dataclass(frozen=True, slots=True)
class CommitResolved:
    """A COMMIT lost its reply and the server was asked what became of it.

    :ivar outcome: ``"committed"`` (reported as success, never run again), ``"aborted"``
        (retryable), ``"read-only"`` (the transaction wrote nothing) or
        ``"unknown"`` (:class:`~dbresilience.CommitOutcomeUnknown`).
    """

    engine: str
    outcome: str


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    """The circuit breaker changed state: ``closed`` -> ``open`` (connects fail fast),
    ``open`` -> ``half-open`` (one probe connect let through), -> ``closed`` (it worked)."""

    engine: str
    old: Literal["closed", "open", "half-open"]
    new: Literal["closed", "open", "half-open"]


@dataclass(frozen=True, slots=True)
class HangAbort:
    """The hang monitor aborted a call waiting on the server.

    :ivar reason: ``"dead-link"`` (the server says that backend is not running the statement)
        or ``"host-hung"`` (the server does not answer at all).
    """

    engine: str
    reason: str


@dataclass(frozen=True, slots=True)
class StatementTimedOut:
    """A statement was cut off at ``command_timeout`` or at the transaction's deadline."""

    engine: str


Event = (
    RetryDetails
    | ConnectFailure
    | Disconnect
    | Invalidation
    | Replay
    | CommitResolved
    | BreakerTransition
    | HangAbort
    | StatementTimedOut
)


class EventHook(Protocol):
    """Receives every event of the engines it is registered for; quick, must not raise."""

    def __call__(self, event: Event) -> None: ...
