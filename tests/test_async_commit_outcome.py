"""Ambiguous commits on async engines, made deterministic by the chaos proxy (see
test_commit_outcome.py): the resolver's out-of-pool connection and queries run inside
SQLAlchemy's greenlet, for asyncpg and psycopg async alike."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from sqlalchemy import exc, text
from sqlalchemy.ext.asyncio import AsyncEngine

import dbresilience
from dbresilience import Policy, create_async_resilient_engine, get_stats, run_async_transaction
from dbresilience.testing import ChaosProxy, PostgresCluster


@pytest.fixture(params=["asyncpg", "psycopg"])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def proxy(pg: PostgresCluster) -> Iterator[ChaosProxy]:
    pg.execute("create table ledger (id int primary key)")
    pg.execute(
        "create table child (id int primary key, parent int references ledger(id) "
        "deferrable initially deferred)"
    )
    with ChaosProxy(pg.host, pg.port) as p:
        yield p


@pytest_asyncio.fixture
async def via_proxy(
    pg: PostgresCluster, proxy: ChaosProxy, driver: str
) -> AsyncIterator[AsyncEngine]:
    engine = create_async_resilient_engine(pg.url(driver, port=proxy.port))
    yield engine
    await engine.dispose()


def _rows(pg: PostgresCluster, table: str) -> list[int]:
    return [int(str(r[0])) for r in pg.execute(f"select id from {table} order by id")]


@pytest.mark.asyncio
async def test_commit_that_happened_is_reported_as_success(
    pg: PostgresCluster, proxy: ChaosProxy, via_proxy: AsyncEngine
) -> None:
    async with via_proxy.begin() as conn:
        await conn.execute(text("insert into ledger values (1)"))
        proxy.close_after(match=b"COMMIT")
    # The block exited without error: the commit was verified on a new connection.
    assert _rows(pg, "ledger") == [1]
    assert get_stats(via_proxy)["commit.committed"] == 1
    async with via_proxy.begin() as conn:  # the dead connection was replaced
        await conn.execute(text("insert into ledger values (2)"))
    assert _rows(pg, "ledger") == [1, 2]


@pytest.mark.asyncio
async def test_commit_that_failed_on_the_server_is_retryable(
    pg: PostgresCluster, proxy: ChaosProxy, via_proxy: AsyncEngine
) -> None:
    # The deferred foreign key fails at COMMIT: the server receives COMMIT and aborts.
    with pytest.raises(dbresilience.DisconnectError) as info:
        async with via_proxy.begin() as conn:
            await conn.execute(text("insert into child values (1, 999)"))
            proxy.close_after(match=b"COMMIT")
    assert isinstance(info.value, exc.OperationalError)
    assert info.value.retryable
    assert "verified not committed" in info.value.classification.reason
    assert _rows(pg, "child") == []
    assert get_stats(via_proxy)["commit.aborted"] == 1


@pytest.mark.asyncio
async def test_run_async_transaction_never_reruns_a_verified_commit(
    pg: PostgresCluster, proxy: ChaosProxy, via_proxy: AsyncEngine
) -> None:
    calls = []

    async def insert(conn: object) -> None:
        calls.append(1)
        await conn.execute(text(f"insert into ledger values ({len(calls)})"))  # type: ignore[attr-defined]
        if len(calls) == 1:
            proxy.close_after(match=b"COMMIT")

    await run_async_transaction(via_proxy, insert)
    assert calls == [1]  # committed: success, not a retry
    assert _rows(pg, "ledger") == [1]


@pytest.mark.asyncio
async def test_unreachable_server_after_the_cut_is_commit_outcome_unknown(
    pg: PostgresCluster, proxy: ChaosProxy, driver: str
) -> None:
    engine = create_async_resilient_engine(
        pg.url(driver, port=proxy.port),
        policy=Policy(commit_check_timeout=1.0, connect_deadline=0.5),
    )
    with pytest.raises(dbresilience.CommitOutcomeUnknown) as info:
        async with engine.begin() as conn:
            await conn.execute(text("insert into ledger values (1)"))
            proxy.close_after(match=b"COMMIT")
            proxy.refuse()
    assert isinstance(info.value, exc.OperationalError)
    assert not info.value.retryable
    await engine.dispose()
