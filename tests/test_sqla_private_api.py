"""Each use of SQLAlchemy's private API (``dbresilience._sqla``), checked against the installed
SQLAlchemy: if a release renames or changes one, this fails here, loudly, by name."""

from __future__ import annotations

import asyncio
import collections
from typing import Any, ClassVar

import psycopg
import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.dialects import plugins
from sqlalchemy.engine import URL, CreateEnginePlugin, make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, NullPool, PoolProxiedConnection, QueuePool

from dbresilience import ConfigurationError, _sqla
from dbresilience.testing import PostgresCluster


def _pool(pg: PostgresCluster, made: list[int]) -> QueuePool:
    def creator() -> psycopg.Connection[Any]:
        made.append(1)
        return psycopg.connect(host=pg.host, port=pg.port, user="postgres")

    return QueuePool(creator, pool_size=2)


def test_pool_creator_get_set_and_invoke(shared_pg: PostgresCluster) -> None:
    made: list[int] = []
    pool = _pool(shared_pg, made)
    original = _sqla.pool_creator(pool)
    original_invoke = _sqla.invoke_creator(pool)
    wrapped: list[Any] = []

    def creator(connection_record: ConnectionPoolEntry | None = None) -> Any:
        wrapped.append(connection_record)
        return original_invoke(connection_record)

    _sqla.set_pool_creator(pool, creator)
    assert _sqla.pool_creator(pool) is creator
    pool.connect().close()  # the pool uses the new creator, with the record
    assert len(wrapped) == 1 and isinstance(wrapped[0], ConnectionPoolEntry)
    outside = _sqla.invoke_creator(pool)(None)  # a connection outside the pool
    outside.close()
    assert wrapped[-1] is None and len(made) == 2
    recreated = pool.recreate()
    assert _sqla.pool_creator(recreated) is creator  # handed on by recreate()
    recreated.dispose()
    original().close()  # what pool_creator() returned first: the creator QueuePool was given
    assert len(made) == 3
    pool.dispose()


def test_wrap_do_get_and_on_recreate(shared_pg: PostgresCluster) -> None:
    pool = _pool(shared_pg, [])
    seen: list[Any] = []

    def wrapper(get: Any) -> Any:
        record = get()
        seen.append(record)
        return record

    _sqla.wrap_do_get(pool, wrapper)
    recreated: list[Any] = []
    _sqla.on_recreate(pool, recreated.append)
    pool.connect().close()
    assert len(seen) == 1 and isinstance(seen[0], ConnectionPoolEntry)
    new = pool.recreate()
    assert recreated == [new]
    pool.dispose()


def test_checkin_failed_returns_the_record(shared_pg: PostgresCluster) -> None:
    pool = _pool(shared_pg, [])
    pool.connect().close()
    assert pool.checkedin() == 1
    record = pool._do_get()  # as the wrapped _do_get gets it
    assert pool.checkedin() == 0
    _sqla.checkin_failed(record, RuntimeError("cancelled"))
    assert pool.checkedin() == 1
    pool.dispose()


def test_execution_context_internals(shared_pg: PostgresCluster) -> None:
    engine = create_engine(shared_pg.url(), pool_size=1)
    seen: dict[str, Any] = {}

    @event.listens_for(engine, "before_cursor_execute")
    def capture(conn: Any, cursor: Any, statement: str, params: Any, context: Any, _: Any) -> None:
        fairy = _sqla.fairy_of_context(context)
        seen["fairy"] = fairy
        seen["record"] = _sqla.record_of(fairy)
        seen["callbacks"] = _sqla.finalize_callbacks(seen["record"])

    with engine.connect() as conn:
        conn.execute(text("select 1"))
        assert seen["fairy"] is conn.connection
    assert isinstance(seen["fairy"], PoolProxiedConnection)
    assert isinstance(seen["record"], ConnectionPoolEntry)
    assert isinstance(seen["callbacks"], collections.deque)
    engine.dispose()


def test_wrap_do_return_conn(shared_pg: PostgresCluster) -> None:
    pool = _pool(shared_pg, [])
    returned: list[ConnectionPoolEntry] = []

    def wrapper(put: Any, record: ConnectionPoolEntry) -> None:
        returned.append(record)
        put(record)

    _sqla.wrap_do_return_conn(pool, wrapper)
    proxy = pool.connect()
    record = proxy._connection_record  # type: ignore[attr-defined]
    proxy.close()
    assert returned == [record] and pool.checkedin() == 1
    pool.dispose()


def test_max_overflow() -> None:
    assert _sqla.max_overflow(QueuePool(lambda: None, pool_size=2, max_overflow=7)) == 7
    assert _sqla.max_overflow(QueuePool(lambda: None, pool_size=2, max_overflow=-1)) == -1
    assert _sqla.max_overflow(NullPool(lambda: None)) == 0


def test_invalidate_older(shared_pg: PostgresCluster) -> None:
    engine = create_engine(shared_pg.url(), pool_size=2)
    contexts: list[Any] = []
    event.listen(
        engine, "before_cursor_execute", lambda *a: contexts.append(a[4])
    )
    with engine.connect() as old:
        old.execute(text("select 1"))
        old_raw = old.connection.dbapi_connection
    with engine.connect() as conn:
        conn.execute(text("select 1"))
        _sqla.invalidate_older(engine.pool, contexts[-1], RuntimeError("disconnect"))
    with engine.connect() as again:  # connections older than the invalidation are recycled
        assert again.connection.dbapi_connection is not old_raw
    engine.dispose()


def test_reapply_characteristics(shared_pg: PostgresCluster) -> None:
    engine = create_engine(shared_pg.url()).execution_options(isolation_level="SERIALIZABLE")
    with engine.connect() as conn:
        conn.execute(text("select 1"))
        conn.commit()
        fresh = psycopg.connect(host=shared_pg.host, port=shared_pg.port, user="postgres")
        _sqla.reapply_characteristics(conn, fresh)
        level = fresh.execute("show transaction_isolation").fetchone()
        fresh.close()
    assert level == ("serializable",)
    engine.dispose()


def test_asyncpg_adapter_transaction(shared_pg: PostgresCluster) -> None:
    async def main() -> tuple[Any, Any]:
        engine = create_async_engine(shared_pg.url(driver="asyncpg"))
        try:
            async with engine.connect() as conn:
                raw = await conn.get_raw_connection()
                before = _sqla.asyncpg_adapter_transaction(raw.dbapi_connection)
                await conn.execute(text("select 1"))  # the adapter opens a transaction
                during = _sqla.asyncpg_adapter_transaction(raw.dbapi_connection)
                await conn.rollback()
            return before, during
        finally:
            await engine.dispose()

    before, during = asyncio.run(main())
    assert before is None and during is not None


def test_check_version() -> None:
    _sqla.check_version("2.0.16")
    _sqla.check_version("2.1.9")
    with pytest.raises(ConfigurationError, match=r"2\.0\.16, found 2\.0\.15"):
        _sqla.check_version("2.0.15")
    with pytest.warns(RuntimeWarning, match=r"2\.2\.0"):
        _sqla.check_version("2.2.0")


class _CapturePlugin(CreateEnginePlugin):
    """Records what the dialect helpers in _sqla see from inside a plugin."""

    seen: ClassVar[list[bool]] = []

    def __init__(self, url: URL, kwargs: dict[str, Any]) -> None:
        super().__init__(url, kwargs)
        _CapturePlugin.seen.append(_sqla.plugin_is_async(kwargs))

    def update_url(self, url: URL) -> URL:
        return url


def test_plugin_is_async_and_dialect_class() -> None:
    plugins.register("dbr_capture", __name__, "_CapturePlugin")
    _CapturePlugin.seen.clear()
    create_engine("postgresql+psycopg://u@h/db", plugins=["dbr_capture"]).dispose()
    create_async_engine("postgresql+psycopg://u@h/db", plugins=["dbr_capture"])
    assert _CapturePlugin.seen == [False, True]
    url = make_url("postgresql+psycopg://u@h/db")
    assert not _sqla.dialect_class(url, is_async=False).is_async
    assert _sqla.dialect_class(url, is_async=True).is_async
    assert _sqla.dialect_class(make_url("postgresql+asyncpg://u@h/db"), is_async=False).driver == (
        "asyncpg"
    )
