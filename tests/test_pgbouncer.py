"""Behind a real PgBouncer (transaction pooling): exactly once under the pooler's own faults,
with psycopg (sync) and with the asyncio drivers (asyncpg, psycopg async).

Needs Debian's ``pgbouncer`` package; ``.ci/run`` installs it. Its version (1.18 on the CI
machines) predates ``max_prepared_statements`` (1.21), so every engine here turns the driver's
server-side prepared statements off (:data:`NO_PREPARED_STATEMENTS`);
``test_prepared_statements_meet_another_server_connection`` shows why.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from _support import async_ledger_workload, check_exactly_once, ledger_workload
from sqlalchemy import Engine, exc, text
from sqlalchemy.ext.asyncio import AsyncEngine

import dbresilience
from dbresilience import create_async_resilient_engine, create_resilient_engine, get_stats
from dbresilience.testing import PostgresCluster
from dbresilience.testing._pgbouncer import PgBouncer, find_pgbouncer

pytestmark = pytest.mark.skipif(
    find_pgbouncer() is None, reason="needs Debian's pgbouncer package (.ci/run installs it)"
)

THREADS = 8
DURATION = 6.0
TASKS = 8  # asyncio tasks of the async drivers' runs
ASYNC_DURATION = 5.0
MAX_SILENCE = 10.0  # seconds a task may go without a commit (the fault itself lasts ~1.5 s)

#: Connect arguments that keep a driver off server-side prepared statements, which a
#: transaction pooler without ``max_prepared_statements`` (PgBouncer < 1.21, or the setting
#: left at 0) cannot honour: the next transaction may run on another server connection.
NO_PREPARED_STATEMENTS: dict[str, dict[str, Any]] = {
    # psycopg (sync and async) prepares a query after 5 runs on a connection, as "_pg3_N".
    "psycopg": {"prepare_threshold": None},
    # asyncpg without its statement cache uses the unnamed statement, sent again (Parse) with
    # every execution. SQLAlchemy's own prepared_statement_cache_size=0 alone is not enough:
    # asyncpg then names every statement (__asyncpg_stmt_<n>__, numbered per process) and never
    # deallocates it on the server connection it landed on.
    "asyncpg": {"statement_cache_size": 0},
}


@pytest.fixture
def bouncer(pg: PostgresCluster) -> Iterator[PgBouncer]:
    # No unique constraint on purpose: a transaction applied twice must show up as a duplicate.
    pg.execute("create table ledger (worker int, seq int)")
    with PgBouncer(pg, pool_mode="transaction") as bouncer:
        yield bouncer


def _engine(bouncer: PgBouncer) -> Engine:
    # Transaction pooling hands each transaction any server connection: no server-side
    # prepared statements (psycopg prepares a query after 5 runs by default).
    return create_resilient_engine(
        bouncer.url(), pool_size=THREADS, connect_args=NO_PREPARED_STATEMENTS["psycopg"]
    )


def _exactly_once_under(
    fault: Callable[[threading.Event], None], pg: PostgresCluster, bouncer: PgBouncer, label: str
) -> dict[str, int]:
    """Run the ledger workload through ``bouncer`` while ``fault`` runs; check it; its stats."""
    engine = _engine(bouncer)
    try:
        ledger = ledger_workload(engine, fault, threads=THREADS, duration=DURATION)
        check_exactly_once(pg, ledger, label=label, minimum=100)
        stats = get_stats(engine)
        print(stats)
        return stats
    finally:
        engine.dispose()


def test_postgres_restart_behind_pgbouncer_exactly_once(
    pg: PostgresCluster, bouncer: PgBouncer
) -> None:
    def restart(stop: threading.Event) -> None:
        stop.wait(1.5)
        pg.restart(down_for=1.0)

    stats = _exactly_once_under(restart, pg, bouncer, "postgres restart behind pgbouncer")
    # PgBouncer keeps our connections through the restart: its errors (server conn crashed,
    # cannot connect to server) are what the retries had to handle.
    assert stats["retry.transaction"] > 0


def test_pgbouncer_restart_exactly_once(pg: PostgresCluster, bouncer: PgBouncer) -> None:
    def restart(stop: threading.Event) -> None:
        stop.wait(1.5)
        bouncer.restart(down_for=1.0)  # every client connection dropped, then refused for 1 s

    stats = _exactly_once_under(restart, pg, bouncer, "pgbouncer restart")
    # The restart really hit: connects were refused, and transactions in flight were cut
    # (absorbed by first-statement replay or by retrying the transaction).
    assert stats["retry.connect"] > 0
    assert stats.get("replay.statement", 0) + stats.get("retry.transaction", 0) > 0


def test_pgbouncer_kill_and_resume_exactly_once(pg: PostgresCluster, bouncer: PgBouncer) -> None:
    def kill(stop: threading.Event) -> None:
        while not stop.wait(0.5):
            # Drops every client and server connection of the database at once.
            bouncer.admin("KILL postgres")
            bouncer.admin("RESUME postgres")

    stats = _exactly_once_under(kill, pg, bouncer, "pgbouncer KILL every 0.5 s")
    assert stats["retry.transaction"] > 0


def test_idle_connections_survive_a_postgres_restart_behind_pgbouncer(
    pg: PostgresCluster, bouncer: PgBouncer
) -> None:
    engine = _engine(bouncer)
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    pg.restart(down_for=0.5)
    started = time.monotonic()
    with engine.begin() as conn:
        assert conn.execute(text("select 2")).scalar_one() == 2
    print(f"first statement after the restart: {time.monotonic() - started:.3f}s")
    engine.dispose()


def test_hang_monitor_behind_pgbouncer_leaves_a_slow_query_alone(
    pg: PostgresCluster, bouncer: PgBouncer
) -> None:
    engine = _engine(bouncer)
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    t0 = time.monotonic()
    with engine.connect() as conn:  # the backend pid the client knows is PgBouncer's
        conn.execute(text("select pg_sleep(3)"))
    took = time.monotonic() - t0
    monitor = dbresilience._engine_hooks.resilience_of(engine).monitor
    stats = get_stats(engine)
    print(f"\nbehind PgBouncer: slow query took {took:.2f}s, {stats}")
    assert monitor.behind_pooler  # noticed at connect: the pids differ
    assert stats.get("hang.slow", 0) > 0  # looked into with the host-level probe only
    assert not any(k.startswith("hang.aborted") for k in stats)
    engine.dispose()


def test_two_hang_monitors_share_pgbouncer_server_connections(
    pg: PostgresCluster, bouncer: PgBouncer
) -> None:
    # Each engine's monitor probes its slow query over and over through the same PgBouncer:
    # a probe prepared server-side (psycopg prepares a query run 5 times; a slow query is
    # looked at once a second) would meet the other monitor's statement of the same name on
    # a shared server connection.
    engines = [_engine(bouncer) for _ in range(2)]

    def slow(engine: Engine) -> None:
        with engine.connect() as conn:
            conn.execute(text("select pg_sleep(8)"))

    threads = [threading.Thread(target=slow, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    stats = [get_stats(e) for e in engines]
    for e in engines:
        e.dispose()
    assert all(s.get("hang.slow", 0) >= 6 for s in stats), stats  # the probes did run
    assert all("hang.no-verdict" not in s for s in stats), stats


# -- the asyncio drivers: create_async_resilient_engine through the same PgBouncer ----------


@pytest.fixture(params=["asyncpg", "psycopg"])
def async_driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _async_engine(bouncer: PgBouncer, driver: str, **kwargs: Any) -> AsyncEngine:
    return create_async_resilient_engine(
        bouncer.url(driver), connect_args=NO_PREPARED_STATEMENTS[driver], **kwargs
    )


async def _async_exactly_once_under(
    fault: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
    pg: PostgresCluster,
    bouncer: PgBouncer,
    driver: str,
    label: str,
) -> dict[str, int]:
    """Run the async ledger workload through ``bouncer`` while ``fault`` runs; check it."""
    engine = _async_engine(bouncer, driver, pool_size=TASKS)
    started = time.monotonic()
    try:
        ledger = await async_ledger_workload(
            engine, fault, tasks=TASKS, duration=ASYNC_DURATION, max_silence=MAX_SILENCE
        )
        check_exactly_once(pg, ledger, label=f"{label} ({driver})", minimum=100)
        stats = get_stats(engine)
        print(f"{stats}\nrun took {time.monotonic() - started:.1f}s")
        assert ledger.longest_silence < MAX_SILENCE
        return stats
    finally:
        await engine.dispose()


@pytest.mark.asyncio
async def test_async_postgres_restart_behind_pgbouncer_exactly_once(
    pg: PostgresCluster, bouncer: PgBouncer, async_driver: str
) -> None:
    async def restart(stop: asyncio.Event) -> None:
        await asyncio.sleep(1.5)
        await asyncio.to_thread(pg.restart, down_for=1.0)

    stats = await _async_exactly_once_under(
        restart, pg, bouncer, async_driver, "postgres restart behind pgbouncer"
    )
    assert stats["retry.transaction"] > 0  # PgBouncer's errors reached the transactions


@pytest.mark.asyncio
async def test_async_pgbouncer_restart_exactly_once(
    pg: PostgresCluster, bouncer: PgBouncer, async_driver: str
) -> None:
    async def restart(stop: asyncio.Event) -> None:
        await asyncio.sleep(1.5)
        await asyncio.to_thread(bouncer.restart, down_for=1.0)

    stats = await _async_exactly_once_under(
        restart, pg, bouncer, async_driver, "pgbouncer restart"
    )
    assert stats["retry.connect"] > 0  # connects were refused while it was down
    assert stats.get("replay.statement", 0) + stats.get("retry.transaction", 0) > 0


@pytest.mark.asyncio
@pytest.mark.parametrize("prepared", ["driver defaults", "off"])
async def test_prepared_statements_meet_another_server_connection(
    pg: PostgresCluster, async_driver: str, prepared: str
) -> None:
    """Why :data:`NO_PREPARED_STATEMENTS`: a statement prepared in one transaction is looked
    for on another server connection in the next one.

    Two server connections (``default_pool_size=2``), three client connections. ``b`` prepares
    a query on server connection S2 while ``a`` holds S1; ``c`` then takes S2 and ``a`` lets S1
    go, so ``b``'s next transaction lands on S1, where its statement does not exist. Which
    server connection a transaction gets is forced (each time only one is idle), not timed.
    """
    query = text("select count(*) from pg_class where relpages >= :n")
    with PgBouncer(pg, pool_mode="transaction", settings={"default_pool_size": "2"}) as small:
        kwargs: dict[str, Any] = {"pool_size": 3, "max_overflow": 0}
        if prepared == "driver defaults":
            engine = create_async_resilient_engine(small.url(async_driver), **kwargs)
        else:
            engine = _async_engine(small, async_driver, **kwargs)
        try:
            async with engine.connect() as a, engine.connect() as b, engine.connect() as c:
                await a.execute(text("select 1"))  # a: BEGIN, holds S1
                for n in range(6):  # past psycopg's prepare_threshold (5); asyncpg: the 1st
                    await b.execute(query, {"n": n})  # on S2, the only idle one
                await b.commit()  # S2 idle
                await c.execute(text("select 1"))  # c takes S2
                await a.commit()  # S1 idle
                try:
                    await b.execute(query, {"n": 0})  # on S1
                except exc.DBAPIError as e:
                    failure: str | None = str(e.orig)
                else:
                    failure = None
                await c.commit()
        finally:
            await engine.dispose()
    print(f"\n{async_driver}, prepared statements {prepared}: {failure or 'no error'}")
    if prepared == "driver defaults":
        assert failure is not None and "prepared statement" in failure, failure
        assert "does not exist" in failure, failure
    else:
        assert failure is None, failure
