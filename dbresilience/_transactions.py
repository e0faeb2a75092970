"""Transactions that survive faults exactly once: :func:`run_transaction`.

``fn`` runs inside a transaction that is committed when it returns. On a *retryable* failure
(disconnect, unavailable, serialization failure, deadlock, lock timeout, resource exhaustion)
the transaction is rolled back and ``fn`` runs again after a backoff, within the policy's
attempt cap and deadline. A failure during COMMIT is never blindly retried: the engine asks
the server what happened (see ``_commit_outcome``) and either reports success, retries a
verified-aborted transaction, or raises :class:`CommitOutcomeUnknown`.

Only failures that come from the database (the driver, SQLAlchemy, dbresilience, or an
exception chained from one of theirs) are retried: an exception of the application's own
(``TimeoutError`` from an HTTP client, ``ConnectionRefusedError`` from Redis) propagates at
once, unchanged, after one call.

``fn`` may therefore run more than once: it must not commit, and side effects outside the
database (emails, HTTP calls) belong after :func:`run_transaction` returns.

The asyncio runner (``_async_transactions``) shares :func:`engine_of` and
:func:`transaction_retrying_kwargs`; only the running of one attempt differs.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar, overload

import tenacity
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from dbresilience._classification import classify, from_database
from dbresilience._engine_hooks import EngineResilience, resilience_of
from dbresilience._errors import ConfigurationError
from dbresilience._hooks._state import statement_deadline
from dbresilience._policy import Policy
from dbresilience._retrying import retry_kwargs

__all__ = ["engine_of", "run_transaction", "transaction_retrying_kwargs", "transactional"]

T = TypeVar("T")
S = TypeVar("S", bound=Session)
P = ParamSpec("P")

Target = Engine | Connection | Session | sessionmaker[Any]


def engine_of(target: object) -> Engine:
    """The engine behind an Engine, Connection, Session or sessionmaker (sync or async)."""
    sync_target = getattr(target, "sync_engine", None) or getattr(target, "sync_connection", None)
    if sync_target is not None:
        target = sync_target
    if isinstance(target, Engine):
        return target
    if isinstance(target, Connection):
        return target.engine
    bind = None
    if isinstance(target, Session) or hasattr(target, "sync_session"):
        session: Any = getattr(target, "sync_session", target)
        bind = session.get_bind()
    elif hasattr(target, "kw"):  # sessionmaker / async_sessionmaker
        bind = target.kw.get("bind")
    bind = getattr(bind, "sync_engine", None) or bind
    if isinstance(bind, Connection):
        bind = bind.engine
    if not isinstance(bind, Engine):
        raise ConfigurationError(
            f"cannot find the engine of {target!r}: pass an Engine, Connection, Session or a "
            "sessionmaker created with bind=<resilient engine>"
        )
    return bind


def _retryable(exc: BaseException) -> bool:
    # The application's own exceptions propagate at once, unchanged (tenacity re-raises).
    return from_database(exc) and classify(exc).retryable


def transaction_retrying_kwargs(
    state: EngineResilience, policy: Policy | None
) -> dict[str, Any]:
    """tenacity arguments for transaction retries (shared by the sync and async runners)."""
    p = policy or state.policy
    return retry_kwargs(
        "transaction",
        attempts=p.attempts,
        deadline=p.deadline,
        wait_initial=p.wait_initial,
        wait_max=p.wait_max,
        stats=state.stats,
        retry_if=_retryable,
    )


def _checked(result: T) -> T:
    if inspect.isawaitable(result):
        getattr(result, "close", lambda: None)()  # no "never awaited" warning
        raise ConfigurationError(
            "run_transaction() got an awaitable from fn: for async def use run_async_transaction()"
        )
    return result


def _once(target: Target, fn: Callable[[Any], T]) -> T:
    if isinstance(target, Engine):
        with target.connect() as conn, conn.begin():
            return _checked(fn(conn))
    if isinstance(target, Connection):
        if target.in_transaction():
            raise ConfigurationError(
                "run_transaction() needs a Connection without a transaction in progress"
            )
        with target.begin():
            return _checked(fn(target))
    if isinstance(target, Session):
        if target.in_transaction():
            raise ConfigurationError(
                "run_transaction() needs a Session without a transaction in progress"
            )
        with target.begin():
            return _checked(fn(target))
    with target() as session, session.begin():
        return _checked(fn(session))


@overload
def run_transaction(
    target: Engine | Connection, fn: Callable[[Connection], T], *, policy: Policy | None = None
) -> T: ...
@overload
def run_transaction(
    target: sessionmaker[S], fn: Callable[[S], T], *, policy: Policy | None = None
) -> T: ...
@overload
def run_transaction(target: S, fn: Callable[[S], T], *, policy: Policy | None = None) -> T: ...
def run_transaction(target: Target, fn: Callable[[Any], T], *, policy: Policy | None = None) -> T:
    """Run ``fn`` in a transaction on ``target``, commit, and retry retryable failures.

    :param target: a resilient :class:`~sqlalchemy.engine.Engine` (``fn`` gets a Connection),
        a :class:`~sqlalchemy.orm.sessionmaker` bound to one (``fn`` gets a Session), or a
        Connection / Session with no transaction in progress (``fn`` gets it back).
    :param fn: the unit of work. It may run more than once and must not commit.
    :param policy: overrides the engine's policy for the retry loop (attempts, deadline, waits).
    :returns: what ``fn`` returned on the attempt that committed.
    :raises: the last classified error when it is not retryable or the budget is spent.
    """
    if not isinstance(target, (Engine, Connection, Session, sessionmaker)):
        raise ConfigurationError(
            "run_transaction() needs an Engine, Connection, Session or sessionmaker, got "
            f"{type(target).__name__}; for asyncio ones use run_async_transaction()"
        )
    state = resilience_of(engine_of(target))
    retrying = tenacity.Retrying(**transaction_retrying_kwargs(state, policy))
    token = statement_deadline.set(time.monotonic() + (policy or state.policy).deadline)
    try:
        result: T = retrying(_once, target, fn)
    finally:
        statement_deadline.reset(token)
    return result


@overload
def transactional(
    target: Engine | Connection, *, policy: Policy | None = None
) -> Callable[[Callable[Concatenate[Connection, P], T]], Callable[P, T]]: ...
@overload
def transactional(
    target: sessionmaker[S], *, policy: Policy | None = None
) -> Callable[[Callable[Concatenate[S, P], T]], Callable[P, T]]: ...
@overload
def transactional(
    target: S, *, policy: Policy | None = None
) -> Callable[[Callable[Concatenate[S, P], T]], Callable[P, T]]: ...
def transactional(
    target: Target, *, policy: Policy | None = None
) -> Callable[[Callable[Concatenate[Any, P], T]], Callable[P, T]]:
    """Decorator form: ``@transactional(SessionLocal)`` passes the session/connection first;
    the decorated function keeps the rest of its signature (typed).

    ::

        @transactional(SessionLocal)
        def transfer(session, src, dst, amount): ...

        transfer(1, 2, 100)  # runs in a retried transaction
    """

    def decorate(func: Callable[Concatenate[Any, P], T]) -> Callable[P, T]:
        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            unit: Callable[[Any], T] = lambda c: func(c, *args, **kwargs)  # noqa: E731
            return run_transaction(target, unit, policy=policy)

        return wrapper

    return decorate
