"""The async resilient engine (asyncpg and psycopg async) under real faults on a real server."""

from __future__ import annotations

import asyncio
import random
import socket
import statistics
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from _support import wait_readable
from sqlalchemy import exc, text
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

import dbresilience
from dbresilience import (
    Policy,
    async_session_factory,
    create_async_resilient_engine,
    get_stats,
    run_async_transaction,
)
from dbresilience.testing import ChaosProxy, PostgresCluster
from dbresilience.testing._cluster import free_port

DRIVERS = ["asyncpg", "psycopg"]

MakeEngine = Callable[..., AsyncEngine]


def _connect_args(driver: str, app: str) -> dict[str, Any]:
    """Tag our sessions so that faults hit only them on the shared server."""
    if driver == "asyncpg":
        return {"server_settings": {"application_name": app}}
    return {"application_name": app}


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def make_engine(
    shared_pg: PostgresCluster, driver: str, request: pytest.FixtureRequest
) -> AsyncIterator[MakeEngine]:
    """Factory of resilient engines on the shared server, tagged with the test's name."""
    app = f"t{abs(hash(request.node.nodeid)) % 10**8}"
    engines: list[AsyncEngine] = []

    def make(**kw: Any) -> AsyncEngine:
        kw.setdefault("connect_args", _connect_args(driver, app))
        engine = create_async_resilient_engine(shared_pg.url(driver), **kw)
        engines.append(engine)
        return engine

    make.app = app  # type: ignore[attr-defined]
    yield make
    for engine in engines:
        await engine.dispose()


async def _pid(conn: AsyncConnection) -> int:
    return int((await conn.execute(text("select pg_backend_pid()"))).scalar_one())


def _kill(pg: PostgresCluster, make: MakeEngine) -> int:
    return pg.terminate_backends(application_name=make.app)  # type: ignore[attr-defined]


def _sessions(pg: PostgresCluster, make: MakeEngine) -> dict[str, int]:
    rows = pg.execute(
        "select coalesce(state, '?'), count(*) from pg_stat_activity "
        f"where application_name = '{make.app}' group by 1"  # type: ignore[attr-defined]
    )
    return {str(state): int(str(n)) for state, n in rows}


# -- the factory ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_factory_returns_a_genuine_async_engine(make_engine: MakeEngine) -> None:
    engine = make_engine()
    assert isinstance(engine, AsyncEngine)
    async with engine.connect() as conn:
        assert (await conn.execute(text("select 41 + 1"))).scalar_one() == 42
    assert dbresilience._engine_hooks.resilience_of(engine).is_async


@pytest.mark.parametrize(
    "url", ["postgresql+psycopg2://u@h/db", "postgresql+pg8000://u@h/db", "sqlite+aiosqlite://"]
)
def test_factory_refuses_other_drivers_by_name(url: str) -> None:
    with pytest.raises(dbresilience.ConfigurationError, match=r"PostgreSQL only|unsupported"):
        create_async_resilient_engine(url)


def test_sync_factory_points_async_urls_to_the_async_one() -> None:
    with pytest.raises(dbresilience.ConfigurationError, match="create_async_resilient_engine"):
        dbresilience.create_resilient_engine("postgresql+asyncpg://u@h/db")


@pytest.mark.asyncio
async def test_install_on_an_existing_async_engine(shared_pg: PostgresCluster, driver: str) -> None:
    engine = create_async_engine(shared_pg.url(driver), connect_args=_connect_args(driver, "inst"))
    dbresilience.install(engine)
    with pytest.raises(dbresilience.ConfigurationError, match="already installed"):
        dbresilience.install(engine)
    async with engine.connect() as conn:
        await conn.execute(text("select 1"))
    shared_pg.terminate_backends(application_name="inst")
    await asyncio.sleep(0.05)
    async with engine.connect() as conn:
        assert (await conn.execute(text("select 1"))).scalar_one() == 1
    stats = get_stats(engine)
    assert stats.get("replay.statement", 0) + stats.get("dead.replaced", 0) == 1
    await engine.dispose()


# -- dead connections ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_killed_idle_connection_is_replaced_transparently(
    shared_pg: PostgresCluster, make_engine: MakeEngine
) -> None:
    # Within the liveness window (an hour: however slow the machine, the next checkout is in
    # it): no socket check, only the driver's own view and the statement.
    engine = make_engine(policy=Policy(liveness_window=3600))
    async with engine.connect() as conn:
        first = await _pid(conn)
    assert _kill(shared_pg, make_engine) == 1
    await asyncio.sleep(0.05)  # the loop may read the FATAL (asyncpg then knows it is closed)
    async with engine.begin() as conn:
        assert await _pid(conn) != first
    stats = get_stats(engine)
    # asyncpg reads the FATAL while idle (is_closed() at checkout); psycopg finds out on use.
    assert stats.get("replay.statement", 0) + stats.get("dead.replaced", 0) == 1
    assert stats.get("error.disconnect", 0) == 0


@pytest.mark.asyncio
async def test_dead_connection_unread_by_the_loop_is_caught_at_checkout(
    shared_pg: PostgresCluster, make_engine: MakeEngine
) -> None:
    engine = make_engine(policy=Policy(liveness_window=0))  # every checkout is vetted
    async with engine.connect() as conn:
        first = await _pid(conn)
    # The event loop stays blocked (on purpose) from the kill to the checkout: the driver
    # cannot read the FATAL, so only the zero-round-trip socket check can notice the dead peer.
    _kill(shared_pg, make_engine)  # returns once the FATAL is on our socket
    async with engine.connect() as conn:
        assert await _pid(conn) != first
    stats = get_stats(engine)
    assert stats["dead.replaced"] == 1
    assert stats.get("replay.statement", 0) == 0


@pytest.mark.asyncio
async def test_task_cancelled_during_the_checkout_ping_gives_the_connection_back(
    shared_pg: PostgresCluster, driver: str
) -> None:
    with ChaosProxy(shared_pg.host, shared_pg.port) as proxy:
        engine = create_async_resilient_engine(
            shared_pg.url(driver, port=proxy.port),
            pool_size=1,
            max_overflow=0,
            pool_timeout=5,
            policy=Policy(liveness_window=0),  # every checkout is vetted
        )
        try:
            async with engine.connect() as conn:
                await conn.execute(text("listen dbresilience_ping"))
                await conn.commit()
                raw = (await conn.get_raw_connection()).dbapi_connection
                fileno = dbresilience._engine_hooks.resilience_of(engine).fileno(raw)
            shared_pg.execute("notify dbresilience_ping")
            # Block the event loop until the NOTIFY is on the socket: the driver cannot read
            # it, so the idle socket is readable and the checkout pings the connection...
            wait_readable(fileno)
            proxy.set_latency(2.0)  # ...and the ping gets no answer for 4 s.

            async def checkout() -> None:
                async with engine.connect() as conn:
                    await conn.execute(text("select 1"))

            task = asyncio.create_task(checkout())
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            proxy.passthrough()
            # The pool's only connection came back (invalidated): none is lost to the cancel.
            assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
            async with engine.connect() as conn:
                assert (await conn.execute(text("select 1"))).scalar_one() == 1
        finally:
            await engine.dispose()


@pytest.mark.asyncio
async def test_explicit_transaction_in_autocommit_mode_is_never_split(
    shared_pg: PostgresCluster, make_engine: MakeEngine
) -> None:
    # A BEGIN sent as a statement on an autocommit connection, then the server kills it: the
    # next statement must fail, not run (and commit on its own) on a new connection while the
    # caller believes it is still inside its transaction.
    shared_pg.execute("create table if not exists split_tx (x int)")
    shared_pg.execute("truncate split_tx")
    engine = make_engine(isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        await conn.exec_driver_sql("BEGIN")
        await conn.execute(text("insert into split_tx values (1)"))
        _kill(shared_pg, make_engine)
        await asyncio.sleep(0.1)
        with pytest.raises(dbresilience.DisconnectError):
            await conn.execute(
                text("insert into split_tx values (2)").execution_options(
                    dbresilience_idempotent=True  # even so: not outside its transaction
                )
            )
    assert shared_pg.execute("select count(*) from split_tx")[0][0] == 0
    assert get_stats(engine).get("replay.statement", 0) == 0


@pytest.mark.asyncio
async def test_kill_mid_transaction_is_a_disconnect_and_an_operational_error(
    shared_pg: PostgresCluster, make_engine: MakeEngine
) -> None:
    engine = make_engine()
    with pytest.raises(exc.OperationalError) as info:
        async with engine.begin() as conn:
            await conn.execute(text("select 1"))
            _kill(shared_pg, make_engine)
            await conn.execute(text("select 2"))
    err = info.value
    # asyncpg's errors reach SQLAlchemy as the generic DBAPIError; ours are OperationalErrors.
    assert isinstance(err, dbresilience.DisconnectError)
    assert err.retryable
    assert err.connection_invalidated
    async with engine.connect() as conn:
        assert (await conn.execute(text("select 3"))).scalar_one() == 3


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["asyncpg"])
async def test_asyncpg_connection_is_closed_is_a_disconnect(make_engine: MakeEngine) -> None:
    engine = make_engine()
    with pytest.raises(dbresilience.DisconnectError) as info:
        async with engine.begin() as conn:
            await conn.execute(text("select 1"))
            raw = await conn.get_raw_connection()
            raw.driver_connection.terminate()  # type: ignore[union-attr]
            await conn.execute(text("select 2"))
    assert info.value.classification.reason == "connection is closed"
    assert isinstance(info.value, exc.DBAPIError) and info.value.connection_invalidated


# -- connecting ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_refused_connect_is_retried_then_database_unavailable(
    shared_pg: PostgresCluster, driver: str
) -> None:
    engine = create_async_resilient_engine(
        shared_pg.url(driver, port=free_port()), policy=Policy(connect_deadline=0.5)
    )
    t0 = time.monotonic()
    with pytest.raises(exc.OperationalError) as info:
        await asyncio.wait_for(engine.connect(), timeout=10)
    elapsed = time.monotonic() - t0
    err = info.value
    assert isinstance(err, dbresilience.DatabaseUnavailable)
    assert err.retryable
    # asyncpg lets a bare ConnectionRefusedError escape SQLAlchemy: it is kept as the cause;
    # psycopg's refusal comes wrapped by SQLAlchemy, its OperationalError as .orig.
    cause = err.__cause__
    import psycopg

    assert isinstance(cause, ConnectionRefusedError if driver == "asyncpg" else psycopg.Error)
    assert err.orig is cause
    assert 0.4 < elapsed < 5
    assert get_stats(engine)["retry.connect"] >= 2
    await engine.dispose()


@pytest.mark.asyncio
async def test_connect_to_a_silent_network_is_bounded(
    shared_pg: PostgresCluster, driver: str
) -> None:
    with ChaosProxy(shared_pg.host, shared_pg.port) as proxy:
        proxy.blackhole()  # the handshake completes, then nothing (asyncpg would wait 60 s)
        engine = create_async_resilient_engine(
            shared_pg.url(driver, port=proxy.port),
            policy=Policy(connect_timeout=2, connect_deadline=1.0),
        )
        t0 = time.monotonic()
        with pytest.raises(dbresilience.DatabaseUnavailable):
            await asyncio.wait_for(engine.connect(), timeout=20)
        assert time.monotonic() - t0 < 4.5
        await engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["asyncpg"])  # psycopg gets them from libpq parameters
async def test_asyncpg_gets_bounded_network_defaults(
    shared_pg: PostgresCluster, make_engine: MakeEngine
) -> None:
    engine = make_engine(policy=Policy(tcp_user_timeout=12.0, command_timeout=7.0))
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
    assert raw is not None
    sock = raw._transport.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 12_000
    # The statement bound is the watchdog's (cheaper than asyncpg's timer per message).
    assert raw._config.command_timeout is None
    assert dbresilience._engine_hooks.resilience_of(engine).call_bound == 7.0
    # The application's own settings win.
    mine = create_async_resilient_engine(
        shared_pg.url("asyncpg"), connect_args={"command_timeout": 3, "timeout": 2}
    )
    async with mine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None and raw._config.command_timeout == 3
    await mine.dispose()


@pytest.mark.asyncio
async def test_silent_server_is_cut_off_by_the_watchdog_never_retried(
    shared_pg: PostgresCluster, make_engine: MakeEngine
) -> None:
    # Cut off by command_timeout, the statement may still be running on the server: it is
    # cancelled there and reported as a timeout, like statement_timeout, never run again.
    engine = make_engine(policy=Policy(command_timeout=0.5))
    attempts = []

    async def hangs(conn: AsyncConnection) -> int:
        attempts.append(1)
        await conn.execute(text("select 1"))
        await conn.execute(text("select pg_sleep(3)"))
        return len(attempts)

    t0 = time.monotonic()
    with pytest.raises(dbresilience.StatementTimeout) as info:
        await asyncio.wait_for(run_async_transaction(engine, hangs), 10)
    assert time.monotonic() - t0 < 2.0
    assert isinstance(info.value, exc.OperationalError) and not info.value.retryable
    assert "did not commit" in str(info.value)
    assert attempts == [1]
    stats = get_stats(engine)
    assert stats["watchdog.fired"] == 1
    assert "retry.transaction" not in stats
    async with engine.connect() as conn:  # the engine goes on with a new connection
        assert (await conn.execute(text("select 1"))).scalar_one() == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["asyncpg"])
async def test_asyncpg_command_timeout_is_a_statement_timeout_never_retried(
    shared_pg: PostgresCluster, make_engine: MakeEngine
) -> None:
    engine = make_engine(
        connect_args={"command_timeout": 0.3, **_connect_args("asyncpg", make_engine.app)}  # type: ignore[attr-defined]
    )
    attempts = []

    async def slow(conn: AsyncConnection) -> None:
        attempts.append(1)
        await conn.execute(text("select pg_sleep(5)"))

    t0 = time.monotonic()
    with pytest.raises(exc.OperationalError) as info:
        await asyncio.wait_for(run_async_transaction(engine, slow), timeout=10)
    assert time.monotonic() - t0 < 2.5
    assert isinstance(info.value, dbresilience.StatementTimeout)
    assert not info.value.retryable
    assert isinstance(info.value.__cause__, TimeoutError)
    assert attempts == [1]
    # asyncpg cancelled the query on the server and the connection was discarded.
    async with engine.connect() as conn:
        assert (await conn.execute(text("select 1"))).scalar_one() == 1
    await asyncio.sleep(0.2)
    assert _sessions(shared_pg, make_engine).get("active", 0) == 0


# -- run_async_transaction and the session factory --------------------------------------------


@pytest.mark.asyncio
async def test_run_async_transaction_retries_a_lost_connection_once(
    shared_pg: PostgresCluster, make_engine: MakeEngine
) -> None:
    shared_pg.execute("create table if not exists async_items (id serial primary key, name text)")
    engine = make_engine()
    SessionLocal = async_session_factory(engine)
    calls = []

    async def add(session: AsyncSession) -> int:
        calls.append(1)
        result = await session.execute(
            text("insert into async_items (name) values ('gadget') returning id")
        )
        if len(calls) == 1:
            _kill(shared_pg, make_engine)  # the first attempt dies before COMMIT
            await session.execute(text("select 1"))
        return int(result.scalar_one())

    with dbresilience.set_testing(True):
        new_id = await asyncio.wait_for(run_async_transaction(SessionLocal, add), timeout=20)
    assert len(calls) == 2
    assert shared_pg.execute(f"select name from async_items where id = {new_id}") == [("gadget",)]
    assert get_stats(engine)["retry.transaction.disconnect"] == 1


@pytest.mark.asyncio
async def test_run_async_transaction_targets(
    shared_pg: PostgresCluster, make_engine: MakeEngine
) -> None:
    engine = make_engine()
    SessionLocal = async_session_factory(engine)
    assert isinstance(SessionLocal, async_sessionmaker)

    async def one(c: Any) -> int:
        return int((await c.execute(text("select 1"))).scalar_one())

    assert await run_async_transaction(engine, one) == 1
    assert await run_async_transaction(SessionLocal, one) == 1
    async with engine.connect() as conn:
        assert await run_async_transaction(conn, one) == 1
        await conn.execute(text("select 1"))  # autobegin
        with pytest.raises(dbresilience.ConfigurationError, match="without a transaction"):
            await run_async_transaction(conn, one)
    # The FastAPI dependency: a session, closed afterwards; usable as a target itself.
    dependency = SessionLocal.dependency()
    session = await anext(dependency)
    assert isinstance(session, AsyncSession)
    assert await run_async_transaction(session, one) == 1
    await dependency.aclose()
    assert not session.in_transaction()


@pytest.mark.asyncio
async def test_non_retryable_error_propagates_at_once(make_engine: MakeEngine) -> None:
    engine = make_engine()
    attempts = []

    async def bad(conn: AsyncConnection) -> None:
        attempts.append(1)
        await conn.execute(text("select * from no_such_table"))

    with pytest.raises(exc.ProgrammingError, match="no_such_table"):
        await run_async_transaction(engine, bad)
    assert attempts == [1]


@pytest.mark.asyncio
async def test_plain_engines_and_sync_targets_are_refused(shared_pg: PostgresCluster) -> None:
    plain = create_async_engine(shared_pg.url("asyncpg"))
    with pytest.raises(dbresilience.ConfigurationError, match="not a resilient engine"):
        await run_async_transaction(plain, lambda c: asyncio.sleep(0))
    with pytest.raises(dbresilience.ConfigurationError, match="not a resilient engine"):
        async_session_factory(plain)
    await plain.dispose()
    sync_engine = dbresilience.create_resilient_engine(shared_pg.url())
    with pytest.raises(dbresilience.ConfigurationError, match="use run_transaction"):
        await run_async_transaction(sync_engine, lambda c: asyncio.sleep(0))  # type: ignore[arg-type]

    async def coroutine_fn(conn: object) -> None: ...

    with pytest.raises(dbresilience.ConfigurationError, match="use run_async_transaction"):
        _ = dbresilience.run_transaction(sync_engine, coroutine_fn)
    sync_engine.dispose()


# -- cancellation --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_cancelled_mid_query_leaves_no_broken_connection(
    shared_pg: PostgresCluster, make_engine: MakeEngine
) -> None:
    shared_pg.execute("create table if not exists async_cancel (x int)")
    engine = make_engine(pool_size=8, max_overflow=0)
    rnd = random.Random(7)
    outcomes = {"cancelled": 0, "completed": 0}
    attempts = []

    async def unit(conn: AsyncConnection) -> None:
        attempts.append(1)
        await conn.execute(text("insert into async_cancel values (1)"))
        await conn.execute(text("select pg_sleep(:s)"), {"s": rnd.choice([0, 0.002, 0.01])})
        await conn.execute(text("select count(*) from async_cancel"))

    async def one(scale: float) -> None:
        try:
            # Cancelled wherever it is: checkout, connect, a statement, COMMIT, checkin.
            deadline = rnd.uniform(0.05, 3) * scale
            await asyncio.wait_for(run_async_transaction(engine, unit), deadline)
            outcomes["completed"] += 1
        except TimeoutError:
            outcomes["cancelled"] += 1

    async def timed() -> float:
        t0 = time.monotonic()
        await run_async_transaction(engine, unit)
        return time.monotonic() - t0

    def inside() -> int:  # cancelled after the unit began: inside the transaction
        return len(attempts) - outcomes["completed"]

    # Also fills the pool: on a loaded machine 16 concurrent connects can all take longer than
    # a short deadline. Cancelled statements still make the pool discard connections and
    # connect anew during the storm.
    durations = await asyncio.gather(*(timed() for _ in range(16)))
    attempts.clear()
    # Deadlines are drawn relative to how long a transaction takes here and now (on a loaded
    # machine everything is slower, the shape is the same): from 0.05 to 3 times a scale that
    # starts at the median of 16 concurrent ones and is steered, round by round, so that
    # about a quarter to a half of the 16 complete. Enough are then cancelled at every point
    # of the transaction, and enough complete, whatever the load.
    scale = statistics.median(durations)
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        enough = outcomes["cancelled"] > 100 and outcomes["completed"] > 20 and inside() > 50
        if (enough and elapsed >= 3.0) or elapsed >= 30.0:
            break
        before = outcomes["completed"]
        await asyncio.gather(*(one(scale) for _ in range(16)))
        completed = outcomes["completed"] - before
        if completed < 4:
            scale *= 1.25
        elif completed > 8:
            scale /= 1.25
    print(f"\n{outcomes} attempts={len(attempts)} scale={scale * 1000:.1f}ms {get_stats(engine)}")
    assert outcomes["cancelled"] > 100 and outcomes["completed"] > 20, outcomes
    assert inside() > 50, inside()  # cancelled inside the transaction
    assert get_stats(engine).get("retry.transaction", 0) == 0  # and never retried

    # Every pooled connection is usable: 200 concurrent checkouts over the 8, no error.
    async def check(i: int) -> int:
        async with engine.connect() as conn:
            return int((await conn.execute(text("select cast(:i as int)"), {"i": i})).scalar_one())

    assert await asyncio.wait_for(asyncio.gather(*(check(i) for i in range(200))), 20) == list(
        range(200)
    )
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]

    # And nothing was left running or holding a transaction on the server (a backend whose
    # client was cut off finds out when it next writes: after its pg_sleep, at the latest).
    def settled() -> bool:
        sessions = _sessions(shared_pg, make_engine)
        return set(sessions) <= {"idle"} and sessions.get("idle", 0) <= 8

    deadline = time.monotonic() + 10
    while not settled() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    sessions = _sessions(shared_pg, make_engine)
    assert set(sessions) <= {"idle"}, sessions
    assert sessions.get("idle", 0) <= 8
