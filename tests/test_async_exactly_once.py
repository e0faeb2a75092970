"""Acceptance: 16 asyncio tasks of ``run_async_transaction(insert-then-count)`` through a 1 s
server restart and through an RST storm, on asyncpg and psycopg async. The ledger is checked
afterwards: nothing acknowledged is missing, nothing is duplicated, no error reached a task,
and no task went quiet (the stuck tasks of plain ``create_async_engine``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from _support import Ledger, async_ledger_workload, check_exactly_once, wait_until_accepting
from sqlalchemy.ext.asyncio import AsyncEngine

from dbresilience import create_async_resilient_engine, get_stats
from dbresilience.testing import ChaosProxy, PostgresCluster

TASKS = 16
DURATION = 6.0  # seconds of load per run
MAX_SILENCE = 5.0  # seconds a task may go without a commit (the restart itself takes ~1.5 s)


async def _workload(
    engine: AsyncEngine, fault: Callable[[asyncio.Event], Coroutine[Any, Any, None]]
) -> Ledger:
    return await async_ledger_workload(
        engine, fault, tasks=TASKS, duration=DURATION, max_silence=MAX_SILENCE
    )


def _check(pg: PostgresCluster, ledger: Ledger, engine: AsyncEngine) -> None:
    check_exactly_once(pg, ledger, label=engine.dialect.driver, minimum=200)
    print(get_stats(engine))
    assert ledger.longest_silence < MAX_SILENCE


@pytest.fixture(params=["asyncpg", "psycopg"])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def ledger_pg(pg: PostgresCluster) -> PostgresCluster:
    # No unique constraint on purpose: a transaction applied twice must show up as a duplicate.
    pg.execute("create table ledger (worker int, seq int)")
    return pg


@pytest.fixture
def proxy(ledger_pg: PostgresCluster) -> Iterator[ChaosProxy]:
    with ChaosProxy(ledger_pg.host, ledger_pg.port) as p:
        yield p


@pytest.mark.asyncio
@pytest.mark.slow
async def test_rst_storm_exactly_once(
    ledger_pg: PostgresCluster, proxy: ChaosProxy, driver: str
) -> None:
    engine = create_async_resilient_engine(ledger_pg.url(driver, port=proxy.port), pool_size=TASKS)

    async def storm(stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(0.3)
            await asyncio.to_thread(proxy.reset_all)

    try:
        ledger = await _workload(engine, storm)
        _check(ledger_pg, ledger, engine)
        assert get_stats(engine)["retry.transaction"] > 0  # the storm really hit transactions
    finally:
        await engine.dispose()


@pytest.mark.asyncio
@pytest.mark.slow
async def test_restart_exactly_once_and_prompt_recovery(
    ledger_pg: PostgresCluster, driver: str
) -> None:
    engine = create_async_resilient_engine(ledger_pg.url(driver), pool_size=TASKS)
    accepting_at: list[float] = []

    def probe() -> None:
        accepted = wait_until_accepting(ledger_pg)
        if accepted is not None:
            accepting_at.append(accepted)

    async def restart(stop: asyncio.Event) -> None:
        await asyncio.sleep(1.5)
        await asyncio.to_thread(ledger_pg.stop)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(ledger_pg.start, wait=False)
        await asyncio.to_thread(probe)

    try:
        ledger = await _workload(engine, restart)
        _check(ledger_pg, ledger, engine)
    finally:
        await engine.dispose()
    assert accepting_at, "server never came back"
    first = min(t for t in ledger.success_times if t > accepting_at[0] - 0.05)
    print(f"first success {first - accepting_at[0]:+.3f}s after the server accepted connections")
    assert first - accepting_at[0] < 1.0
