"""Replay of a transaction's first statement (SQLAlchemy's ``do_begin`` noted): still replayed
after the backend died between checkout and that statement, whatever began the transaction;
never for a later one (the closed-mid-transaction cases are in test_real_app.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.orm import Session

from dbresilience import create_async_resilient_engine, create_resilient_engine, get_stats
from dbresilience.testing import PostgresCluster

APP = "revreplay"


def _url(pg: PostgresCluster, driver: str = "psycopg") -> str:
    return pg.url(driver) + f"?application_name={APP}"


def _kill(pg: PostgresCluster) -> None:
    assert pg.terminate_backends(application_name=APP) == 1


def _setup(pg: PostgresCluster) -> None:
    pg.execute("create table if not exists rev_t (id int)")
    pg.execute("truncate rev_t")


@pytest.mark.parametrize(
    "how", ["engine_begin", "connect_autobegin", "session", "begin_nested_first",
            "autocommit_idempotent", "begin_listener"]
)
def test_first_statement_replayed(shared_pg: PostgresCluster, how: str) -> None:
    _setup(shared_pg)
    engine = create_resilient_engine(_url(shared_pg), pool_size=1)
    if how == "begin_listener":
        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:  # an app's per-transaction setting
            pass
    with engine.connect():
        pass
    before = get_stats(engine).replays
    try:
        if how in ("engine_begin", "begin_listener"):
            with engine.begin() as conn:
                _kill(shared_pg)
                conn.execute(text("insert into rev_t values (1)"))
        elif how == "connect_autobegin":
            with engine.connect() as conn:
                _kill(shared_pg)
                conn.execute(text("insert into rev_t values (1)"))
                conn.commit()
        elif how == "session":
            with Session(engine) as s:
                s.connection()  # checked out, transaction begun
                _kill(shared_pg)
                s.execute(text("insert into rev_t values (1)"))
                s.commit()
        elif how == "begin_nested_first":
            with engine.connect() as conn:
                _kill(shared_pg)
                with conn.begin_nested():
                    conn.execute(text("insert into rev_t values (1)"))
                conn.commit()
        elif how == "twophase":
            with engine.connect() as conn:
                _kill(shared_pg)
                t = conn.begin_twophase()
                conn.execute(text("insert into rev_t values (1)"))
                t.rollback()
            shared_pg.execute("insert into rev_t values (1)")
        elif how == "autocommit_idempotent":
            with engine.connect().execution_options(
                isolation_level="AUTOCOMMIT", dbresilience_idempotent=True
            ) as conn:
                _kill(shared_pg)
                conn.execute(text("insert into rev_t values (1)"))
        assert shared_pg.execute("select count(*) from rev_t") == [(1,)]
        assert get_stats(engine).replays == before + 1
    finally:
        engine.dispose()


async def _async_engine_begin(pg: PostgresCluster, driver: str) -> tuple[int, int]:
    if driver == "asyncpg":
        engine = create_async_resilient_engine(
            pg.url(driver), pool_size=1, connect_args={"server_settings": {"application_name": APP}}
        )
    else:
        engine = create_async_resilient_engine(_url(pg, driver), pool_size=1)
    try:
        async with engine.connect():
            pass
        async with engine.begin() as conn:
            await asyncio.to_thread(_kill, pg)
            await conn.execute(text("insert into rev_t values (1)"))
            await conn.execute(text("insert into rev_t values (2)"))
        return get_stats(engine).replays, len(pg.execute("select * from rev_t"))
    finally:
        await engine.dispose()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_async_engine_begin_first_statement_replayed(
    shared_pg: PostgresCluster, driver: str
) -> None:
    _setup(shared_pg)
    replays, rows = asyncio.run(_async_engine_begin(shared_pg, driver))
    assert (replays, rows) == (1, 2)
