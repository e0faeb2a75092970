"""asyncio: :func:`run_async_transaction` and :func:`async_session_factory`.

The retry rules are those of :func:`~dbresilience.run_transaction`, from the same tenacity
configuration (:func:`~dbresilience._transactions.transaction_retrying_kwargs`) run by
``tenacity.AsyncRetrying``, whose backoff sleeps on the event loop. What happens during COMMIT
is decided by the engine, sync or async alike. Only the runner of one attempt differs: it
awaits ``fn``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar, overload

import tenacity
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from dbresilience._engine_hooks import resilience_of
from dbresilience._errors import ConfigurationError
from dbresilience._hooks._state import statement_deadline
from dbresilience._policy import Policy
from dbresilience._transactions import engine_of, transaction_retrying_kwargs

__all__ = ["AsyncSessionFactory", "async_session_factory", "run_async_transaction"]

T = TypeVar("T")
S = TypeVar("S", bound=AsyncSession)

AsyncTarget = AsyncEngine | AsyncConnection | AsyncSession | async_sessionmaker[Any]


async def _once(target: AsyncTarget, fn: Callable[[Any], Awaitable[T]]) -> T:
    if isinstance(target, AsyncEngine):
        async with target.connect() as conn, conn.begin():
            return await fn(conn)
    if isinstance(target, (AsyncConnection, AsyncSession)):
        if target.in_transaction():
            raise ConfigurationError(
                f"run_async_transaction() needs an {type(target).__name__} without a "
                "transaction in progress"
            )
        async with target.begin():
            return await fn(target)
    async with target() as session, session.begin():
        return await fn(session)


@overload
async def run_async_transaction(
    target: AsyncEngine | AsyncConnection,
    fn: Callable[[AsyncConnection], Awaitable[T]],
    *,
    policy: Policy | None = None,
) -> T: ...
@overload
async def run_async_transaction(
    target: async_sessionmaker[S], fn: Callable[[S], Awaitable[T]], *, policy: Policy | None = None
) -> T: ...
@overload
async def run_async_transaction(
    target: S, fn: Callable[[S], Awaitable[T]], *, policy: Policy | None = None
) -> T: ...
async def run_async_transaction(
    target: AsyncTarget, fn: Callable[[Any], Awaitable[T]], *, policy: Policy | None = None
) -> T:
    """Await ``fn`` in a transaction on ``target``, commit, and retry retryable failures.

    The asyncio twin of :func:`~dbresilience.run_transaction`, with the same rules: retryable
    failures (disconnect, unavailable, conflict, exhaustion) roll back and run ``fn`` again
    after a backoff, within the policy's attempts and deadline; a COMMIT whose reply was lost
    is resolved by asking the server, never re-run blindly.

    :param target: a resilient :class:`~sqlalchemy.ext.asyncio.AsyncEngine` (``fn`` gets an
        AsyncConnection), an :class:`~sqlalchemy.ext.asyncio.async_sessionmaker` bound to one
        (``fn`` gets an AsyncSession), or an AsyncConnection / AsyncSession with no transaction
        in progress (``fn`` gets it back).
    :param fn: ``async def`` unit of work. It may run more than once and must not commit.
    :param policy: overrides the engine's policy for the retry loop (attempts, deadline, waits).
    :returns: what ``fn`` returned on the attempt that committed.
    :raises: the last classified error when it is not retryable or the budget is spent.
        Cancelling the awaiting task cancels the attempt in flight and is never retried.
    """
    if not isinstance(target, (AsyncEngine, AsyncConnection, AsyncSession, async_sessionmaker)):
        raise ConfigurationError(
            "run_async_transaction() needs an AsyncEngine, AsyncConnection, AsyncSession or "
            f"async_sessionmaker, got {type(target).__name__}; for sync ones use run_transaction()"
        )
    state = resilience_of(engine_of(target))
    retrying = tenacity.AsyncRetrying(**transaction_retrying_kwargs(state, policy))
    token = statement_deadline.set(time.monotonic() + (policy or state.policy).deadline)
    try:
        result: T = await retrying(_once, target, fn)
    finally:
        statement_deadline.reset(token)
    return result


class AsyncSessionFactory(async_sessionmaker[AsyncSession]):
    """An :class:`~sqlalchemy.ext.asyncio.async_sessionmaker` with a ready-made dependency."""

    async def dependency(self) -> AsyncGenerator[AsyncSession, None]:
        """Yield a new session and close it afterwards, for dependency injection::

            async def handler(session: AsyncSession = Depends(SessionLocal.dependency)): ...
        """
        async with self() as session:
            yield session


def async_session_factory(engine: AsyncEngine, **kw: Any) -> AsyncSessionFactory:
    """An ``async_sessionmaker`` bound to the resilient ``engine`` (a plain one is refused).

    Same keyword arguments as :class:`~sqlalchemy.ext.asyncio.async_sessionmaker`;
    ``expire_on_commit`` defaults to False, as SQLAlchemy recommends for asyncio (after a
    commit, attribute access must not need implicit I/O). With FastAPI::

        SessionLocal = async_session_factory(engine)

        @app.post("/orders")
        async def create(session: AsyncSession = Depends(SessionLocal.dependency)): ...

    and ``await run_async_transaction(SessionLocal, fn)`` for work that must happen once.
    """
    resilience_of(engine)
    kw.setdefault("expire_on_commit", False)
    return AsyncSessionFactory(engine, **kw)
