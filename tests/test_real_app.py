"""The engine as real applications use it (issue 10): the paths the fault workloads do not take.

Each test reproduces, on a real server, a way the engine used to be wrong: a statement cut off
by ``command_timeout`` and run twice, the application's own exceptions retried, bounds lost in
a forked worker, ``execution_options`` engines refused, ``do_connect`` listeners skipped,
checkout state lost after recovery, a read-only role retried for 30 s, a commit check defeated
by an open breaker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from _support import join_all, result_of_forked, start_forked
from sqlalchemy import Connection, Engine, event, exc, text
from sqlalchemy.ext.asyncio import AsyncConnection

import dbresilience
from dbresilience import (
    Policy,
    create_async_resilient_engine,
    create_resilient_engine,
    get_stats,
    run_async_transaction,
    run_transaction,
)
from dbresilience.testing import ChaosProxy, PostgresCluster

# command_timeout where a statement must be cut off: well above what the other statements of
# these tests take even on a loaded 2-core machine (the cut ones sleep 10-30 s).
CUT = 1.5


def _slow_commit(pg: PostgresCluster, table: str, *, seconds: int) -> None:
    """COMMITs of transactions that inserted into ``table`` take ``seconds`` on the server
    (a deferred constraint trigger sleeps)."""
    pg.execute(
        "create function slow() returns trigger language plpgsql as "
        f"$$ begin perform pg_sleep({seconds}); return null; end $$"
    )
    pg.execute(
        f"create constraint trigger slow after insert on {table} deferrable initially deferred "
        "for each row execute function slow()"
    )


def _running(pg: PostgresCluster, needle: str) -> int:
    """How many backends are running a statement containing ``needle``."""
    rows = pg.execute(
        "select count(*) from pg_stat_activity where state = 'active' "
        f"and query like '%{needle}%' and pid <> pg_backend_pid()"
    )
    return int(str(rows[0][0]))


def _wait_until_running(pg: PostgresCluster, needle: str, within: float) -> bool:
    """Whether a backend runs ``needle`` within ``within`` seconds (polled every 10 ms)."""
    deadline = time.monotonic() + within
    while _running(pg, needle) == 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _wait_until_not_running(pg: PostgresCluster, needle: str, within: float) -> float | None:
    """Seconds until no backend runs ``needle`` (None: still running after ``within`` s)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if _running(pg, needle) == 0:
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


# -- 1. a statement cut off by command_timeout: never run twice, cancelled on the server -----


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_cut_statement_runs_once_and_is_cancelled(pg: PostgresCluster, driver: str) -> None:
    pg.execute("create sequence s")
    policy = Policy(command_timeout=CUT)
    statement = "select nextval('s'), pg_sleep(30) /* cut-me */"

    def in_a_transaction(conn: Any) -> None:
        conn.execute(text(statement))

    t0 = time.monotonic()
    if driver == "psycopg":
        engine = create_resilient_engine(pg.url(), policy=policy)
        with pytest.raises(dbresilience.StatementTimeout) as info, engine.begin() as conn:
            in_a_transaction(conn)
        engine.dispose()
    else:

        async def main() -> BaseException:
            aengine = create_async_resilient_engine(pg.url(driver="asyncpg"), policy=policy)
            try:
                async with aengine.begin() as aconn:
                    await aconn.execute(text(statement))
            except Exception as e:
                return e
            finally:
                await aengine.dispose()
            raise AssertionError("the statement was not cut off")

        error = asyncio.run(main())
        assert isinstance(error, dbresilience.StatementTimeout), repr(error)
        info = pytest.ExceptionInfo.from_exception(error)
    took = time.monotonic() - t0
    err = info.value
    assert isinstance(err, exc.OperationalError)  # existing except clauses still catch it
    assert not isinstance(err, dbresilience.DisconnectError)
    assert not err.retryable
    assert f"command_timeout={CUT:g}s" in str(err) and "did not commit" in str(err)
    assert took < CUT + 4, took
    # Run once: the sequence moved by one. And cancelled: no backend still sleeps 30 s.
    assert pg.execute("select last_value, is_called from s") == [(1, True)]
    gone_after = _wait_until_not_running(pg, "cut-me", within=5)
    assert gone_after is not None, "the cut statement is still running on the server"


def test_cut_autocommit_statement_does_not_claim_it_did_not_commit(pg: PostgresCluster) -> None:
    pg.execute("create sequence s")
    engine = create_resilient_engine(pg.url(), policy=Policy(command_timeout=CUT))
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    with pytest.raises(dbresilience.StatementTimeout) as info, autocommit.connect() as conn:
        conn.execute(
            text("select nextval('s'), pg_sleep(30) /* cut-me */"),
            execution_options={"dbresilience_idempotent": True},  # even so: never replayed
        )
    assert "did not commit" not in str(info.value)
    assert "outcome is unknown" in str(info.value)
    assert pg.execute("select last_value from s") == [(1,)]
    assert _wait_until_not_running(pg, "cut-me", within=5) is not None
    engine.dispose()


def test_run_transaction_does_not_rerun_a_cut_statement(pg: PostgresCluster) -> None:
    pg.execute("create sequence s")
    engine = create_resilient_engine(pg.url(), policy=Policy(command_timeout=CUT))
    calls = []

    def slow(conn: Connection) -> None:
        calls.append(1)
        conn.execute(text("select nextval('s'), pg_sleep(30) /* cut-me */"))

    with pytest.raises(dbresilience.StatementTimeout):
        run_transaction(engine, slow)
    assert len(calls) == 1
    assert pg.execute("select last_value from s") == [(1,)]
    engine.dispose()


# -- 2. the application's own exceptions are never retried ------------------------------------

APP_ERRORS = [
    FileNotFoundError(2, "No such file or directory", "/etc/app/missing.json"),
    ConnectionRefusedError(111, "Connection refused (redis)"),
    TimeoutError("the payment API did not answer"),
]


@pytest.mark.parametrize("error", APP_ERRORS, ids=lambda e: type(e).__name__)
def test_app_exception_propagates_unchanged_after_one_call(
    shared_pg: PostgresCluster, error: Exception
) -> None:
    engine = create_resilient_engine(shared_pg.url())
    calls = []

    def unit(conn: Connection) -> None:
        calls.append(1)
        conn.execute(text("select 1"))
        raise error

    with pytest.raises(type(error)) as info:
        run_transaction(engine, unit)
    assert info.value is error
    assert len(calls) == 1
    engine.dispose()


@pytest.mark.parametrize("error", APP_ERRORS, ids=lambda e: type(e).__name__)
def test_app_exception_propagates_unchanged_after_one_call_async(
    shared_pg: PostgresCluster, error: Exception
) -> None:
    calls = []

    async def unit(conn: AsyncConnection) -> None:
        calls.append(1)
        await conn.execute(text("select 1"))
        raise error

    async def main() -> None:
        engine = create_async_resilient_engine(shared_pg.url(driver="asyncpg"))
        try:
            with pytest.raises(type(error)) as info:
                await run_async_transaction(engine, unit)
            assert info.value is error
        finally:
            await engine.dispose()

    asyncio.run(main())
    assert len(calls) == 1


def test_app_exception_chained_from_a_disconnect_is_retried(shared_pg: PostgresCluster) -> None:
    class LookupFailed(Exception):
        pass

    engine = create_resilient_engine(shared_pg.url())
    calls = []

    def unit(conn: Connection) -> int:
        calls.append(1)
        conn.execute(text("select 1"))
        if len(calls) == 1:
            shared_pg.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity "
                "where application_name = 'chained'"
            )
            try:
                conn.execute(text("select 2"))
            except exc.OperationalError as e:
                raise LookupFailed("lookup failed") from e
        return 7

    chained = create_resilient_engine(
        shared_pg.url(), connect_args={"application_name": "chained"}
    )
    with dbresilience.set_testing(True):
        assert run_transaction(chained, unit) == 7
    assert len(calls) == 2
    chained.dispose()
    engine.dispose()


# -- 3. forked workers keep every bound ----------------------------------------------------------


def _child_runs_slow_statement(engine: Engine, conn: Any) -> None:
    try:
        engine.dispose(close=False)  # SQLAlchemy's advice for a forked child
        t0 = time.monotonic()
        try:
            with engine.connect() as c:
                c.execute(text("select pg_sleep(20)"))
            conn.send(("returned", time.monotonic() - t0))
        except Exception as e:
            conn.send((type(e).__name__, time.monotonic() - t0))
    finally:
        conn.close()


def test_forked_worker_keeps_command_timeout(pg: PostgresCluster) -> None:
    engine = create_resilient_engine(pg.url(), policy=Policy(command_timeout=CUT))
    with engine.connect() as conn:  # the parent's watchdog is running, pool has a connection
        conn.execute(text("select 1"))
    child, parent_end = start_forked(_child_runs_slow_statement, engine)
    outcome, took = result_of_forked(
        child, parent_end, timeout=15, message="the child's statement was not bounded"
    )
    assert child.exitcode == 0, child.exitcode
    assert outcome == "StatementTimeout", outcome
    assert took < CUT + 4, took
    engine.dispose()


def test_a_dead_watchdog_is_restarted_loudly(
    shared_pg: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    from dbresilience._watchdog import watchdog

    engine = create_resilient_engine(shared_pg.url(), policy=Policy(command_timeout=CUT))
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    assert watchdog.alive
    watchdog._thread = threading.Thread(target=lambda: None)  # stands for a thread that died
    watchdog._thread.start()
    watchdog._thread.join()
    engine.dispose()
    with caplog.at_level(logging.ERROR, logger="dbresilience"), engine.connect() as conn:
        assert watchdog.alive
        with pytest.raises(dbresilience.StatementTimeout):
            conn.execute(text("select pg_sleep(10)"))
    assert any("watchdog thread was dead" in r.getMessage() for r in caplog.records)
    engine.dispose()


# -- 4. engines from engine.execution_options(...) --------------------------------------------


def test_execution_options_engine_keeps_every_behaviour(pg: PostgresCluster) -> None:
    pg.execute("create table t (id int primary key)")
    engine = create_resilient_engine(pg.url(), pool_size=2)
    serializable = engine.execution_options(isolation_level="SERIALIZABLE")
    assert get_stats(serializable) is not None

    def unit(conn: Connection) -> str:
        conn.execute(text("insert into t values (1)"))
        return str(conn.execute(text("show transaction_isolation")).scalar_one())

    assert run_transaction(serializable, unit) == "serializable"
    # A killed backend: the first statement is replayed on a new connection, still serializable.
    with serializable.connect() as conn:
        conn.execute(text("select 1"))
        conn.commit()
        pg.terminate_backends()
        level = conn.execute(text("show transaction_isolation")).scalar_one()
        conn.commit()
    assert level == "serializable"
    assert get_stats(engine)["replay.statement"] == 1
    engine.dispose()


def test_serialization_failures_retried_on_an_execution_options_engine(
    pg: PostgresCluster,
) -> None:
    pg.execute("create table acct (id int primary key, n int)")
    pg.execute("insert into acct values (1, 0), (2, 0)")
    engine = create_resilient_engine(pg.url()).execution_options(isolation_level="SERIALIZABLE")
    barrier = threading.Barrier(2)
    attempts = []

    def write_skew(conn: Connection, mine: int, other: int) -> None:
        attempts.append(mine)
        total = conn.execute(text("select sum(n) from acct")).scalar_one()
        if len(attempts) <= 2:
            barrier.wait(5)  # both read before either writes: one must fail with 40001
        conn.execute(text("update acct set n = :n where id = :id"), {"n": total + 1, "id": mine})

    errors: list[BaseException] = []

    def worker(mine: int, other: int) -> None:
        try:
            run_transaction(engine, lambda c: write_skew(c, mine, other))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=a) for a in ((1, 2), (2, 1))]
    for t in threads:
        t.start()
    join_all(threads, timeout=30)
    assert not errors, errors
    assert len(attempts) == 3  # one of the two ran again
    assert get_stats(engine)["retry.transaction.transaction-conflict"] == 1
    engine.dispose()


def test_async_execution_options_engine(shared_pg: PostgresCluster) -> None:
    async def main() -> str:
        engine = create_async_resilient_engine(shared_pg.url(driver="asyncpg"))
        try:
            ser = engine.execution_options(isolation_level="SERIALIZABLE")

            async def unit(conn: AsyncConnection) -> str:
                return str((await conn.execute(text("show transaction_isolation"))).scalar_one())

            return await run_async_transaction(ser, unit)
        finally:
            await engine.dispose()

    assert asyncio.run(main()) == "serializable"


# -- 5. users' do_connect listeners; creator= engines -------------------------------------------


def test_users_do_connect_listener_runs_on_every_attempt(scram_pg: PostgresCluster) -> None:
    from _support import SCRAM_ROLE, SCRAM_SECRET

    engine = create_resilient_engine(scram_pg.url(user=SCRAM_ROLE), pool_size=1)
    tokens = []

    @event.listens_for(engine, "do_connect")
    def provide_token(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        tokens.append(1)  # e.g. a fresh IAM / Entra ID token
        cparams["password"] = SCRAM_SECRET

    with engine.connect() as conn:
        assert conn.execute(text("select current_user")).scalar_one() == SCRAM_ROLE
    assert tokens == [1]
    # Our network defaults are still applied underneath the user's listener.
    with engine.connect() as conn:
        params = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
        assert params["tcp_user_timeout"] == "30000" and params["keepalives"] == "1"
    engine.dispose()


def test_creator_engine_is_protected(pg: PostgresCluster, caplog: pytest.LogCaptureFixture) -> None:
    made = []

    def creator() -> psycopg.Connection[Any]:
        made.append(1)
        return psycopg.connect(host=pg.host, port=pg.port, user="postgres", connect_timeout=2)

    engine = create_resilient_engine(
        "postgresql+psycopg://", creator=creator, policy=Policy(command_timeout=CUT)
    )
    pg.stop()
    restart = threading.Timer(1.0, pg.start)
    restart.start()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="dbresilience"), engine.connect() as conn:
        # Connect retried until the server came back; statements bounded by the watchdog.
        assert conn.execute(text("select 1")).scalar_one() == 1
        took = time.monotonic() - t0
        with pytest.raises(dbresilience.StatementTimeout):
            conn.execute(text("select pg_sleep(10)"))
    join_all([restart], timeout=70, what="pg_ctl start")  # may still wait for its server
    assert len(made) > 1 and took >= 0.9
    assert get_stats(engine)["retry.connect"] >= 1
    assert any("creator=" in r.getMessage() for r in caplog.records)
    engine.dispose()


def test_async_creator_engine_is_protected(pg: PostgresCluster) -> None:
    import asyncpg

    async def async_creator() -> Any:
        return await asyncpg.connect(host=pg.host, port=pg.port, user="postgres", timeout=2)

    async def main() -> int:
        engine = create_async_resilient_engine(
            "postgresql+asyncpg://", async_creator=async_creator
        )
        try:
            pg.stop()
            restart = threading.Timer(1.0, pg.start)
            restart.start()
            async with engine.connect() as conn:
                value = (await conn.execute(text("select 1"))).scalar_one()
            assert get_stats(engine)["retry.connect"] >= 1
            # pg_ctl start may still be waiting for the server it started
            await asyncio.to_thread(join_all, [restart], timeout=70, what="pg_ctl start")
            return int(value)
        finally:
            await engine.dispose()

    assert asyncio.run(main()) == 1


# -- 7. checkout / connect listener state survives recovery -----------------------------------


@pytest.fixture
def tenant_engine(pg: PostgresCluster) -> Iterator[Engine]:
    pg.execute("create role tenant_a nologin")
    pg.execute("create schema app_a")
    # A window of an hour: a checkout is vetted because of the checkout listener, not because
    # the test was slow to get to it.
    engine = create_resilient_engine(
        pg.url(), pool_size=2, max_overflow=0, policy=Policy(liveness_window=3600)
    )

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_conn: Any, record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute("set search_path = app_a")
        dbapi_conn.commit()

    @event.listens_for(engine, "checkout")
    def on_checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute("set role tenant_a")
        dbapi_conn.commit()

    yield engine
    engine.dispose()


WHO = "select current_user, current_setting('search_path')"


def test_checkout_listener_never_meets_a_killed_connection(
    pg: PostgresCluster, tenant_engine: Engine
) -> None:
    with tenant_engine.connect() as conn:
        assert tuple(conn.execute(text(WHO)).one()) == ("tenant_a", "app_a")
    pg.terminate_backends()  # returns once the FATAL is on the idle pooled socket
    with tenant_engine.begin() as conn:  # within the window, yet vetted: it has a listener
        assert tuple(conn.execute(text(WHO)).one()) == ("tenant_a", "app_a")
    assert get_stats(tenant_engine)["dead.replaced"] == 1


def test_replayed_statement_runs_as_the_same_tenant(
    pg: PostgresCluster, tenant_engine: Engine
) -> None:
    with tenant_engine.connect() as conn:
        conn.execute(text("select 1"))
        conn.commit()
        pg.terminate_backends()  # killed while checked out: the next statement is replayed
        who = tuple(conn.execute(text(WHO)).one())
        conn.commit()
    assert who == ("tenant_a", "app_a")
    assert get_stats(tenant_engine)["replay.statement"] == 1


# -- 8. 25006: a read-only role on a primary is the application's error -----------------------


def test_read_only_role_on_a_primary_fails_at_once(pg: PostgresCluster) -> None:
    pg.execute("create table t (id int)")
    pg.execute("create role reader login")
    pg.execute("alter role reader set default_transaction_read_only = on")
    engine = create_resilient_engine(pg.url(user="reader"))
    calls = []

    def insert(conn: Connection) -> None:
        calls.append(1)
        conn.execute(text("insert into t values (1)"))

    t0 = time.monotonic()
    with pytest.raises(exc.InternalError) as info:
        run_transaction(engine, insert)
    took = time.monotonic() - t0
    assert not isinstance(info.value, dbresilience.ResilienceError)
    assert "read-only transaction" in str(info.value)
    assert len(calls) == 1 and took < 2, (calls, took)
    stats = get_stats(engine)
    assert "error.unavailable" not in stats and "retry.transaction" not in stats
    engine.dispose()


def test_read_only_error_from_a_standby_is_a_failover_signal(pg: PostgresCluster) -> None:
    pg.execute("create table t (id int)")
    standby = PostgresCluster(standby_of=pg)
    standby.start()
    try:
        engine = create_resilient_engine(standby.url())
        with pytest.raises(dbresilience.DatabaseUnavailable) as info, engine.begin() as conn:
            conn.execute(text("insert into t values (1)"))
        assert info.value.retryable and info.value.sqlstate == "25006"
        engine.dispose()
    finally:
        standby.destroy()


# -- 9. commit_check_timeout bounds the whole resolution, which survives an open breaker ------


@pytest.fixture
def proxy(pg: PostgresCluster) -> Iterator[ChaosProxy]:
    with ChaosProxy(pg.host, pg.port) as p:
        yield p


def test_commit_check_is_bounded_when_the_server_hangs(
    pg: PostgresCluster, proxy: ChaosProxy
) -> None:
    pg.execute("create table ledger (id int primary key)")
    engine = create_resilient_engine(
        pg.url(port=proxy.port), policy=Policy(commit_check_timeout=1.5)
    )
    # A "server" that completes the TCP handshake and never says a word: every connect the
    # check makes hangs until its own timeout.
    with socket.socket() as hung, engine.connect() as conn:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)
        conn.execute(text("insert into ledger values (1)"))
        proxy.close_after(match=b"COMMIT")
        proxy.set_upstream(*hung.getsockname())
        t0 = time.monotonic()
        with pytest.raises(dbresilience.CommitOutcomeUnknown):
            conn.commit()
        took = time.monotonic() - t0
    # libpq's connect_timeout is whole seconds, 2 at least: one attempt may overrun by that.
    assert took < 1.5 + 2.5, took
    assert pg.execute("select id from ledger") == [(1,)]  # it did commit: unknown, not lost
    engine.dispose()


def test_commit_check_polls_on_one_connection_until_the_commit_finishes(
    pg: PostgresCluster, proxy: ChaosProxy
) -> None:
    pg.execute("create table ledger (id int primary key)")
    # A COMMIT that takes 2 s on the server: a deferred constraint trigger sleeps.
    _slow_commit(pg, "ledger", seconds=2)
    # The hang monitor's connection (its do_connect run too) is not the subject here.
    engine = create_resilient_engine(
        pg.url(port=proxy.port), policy=Policy(hang_threshold=0)
    )
    connects = []

    @event.listens_for(engine, "do_connect")
    def count(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        connects.append(conn_rec)

    with engine.begin() as conn:
        conn.execute(text("insert into ledger values (1)"))
        before = len(connects)
        proxy.close_after(match=b"COMMIT")
    stats = get_stats(engine)
    assert stats["commit.committed"] == 1
    assert stats["commit-check.polls"] >= 3  # "in progress" for about 2 s
    assert stats["commit-check.connections"] == 1
    assert len(connects) - before == 1  # one physical connection for all the polls
    assert pg.execute("select id from ledger") == [(1,)]
    engine.dispose()


def test_commit_check_is_not_refused_by_an_open_breaker(
    pg: PostgresCluster, proxy: ChaosProxy
) -> None:
    pg.execute("create table ledger (id int primary key)")
    engine = create_resilient_engine(
        pg.url(port=proxy.port),
        policy=Policy(
            breaker_failures=1, breaker_min_duration=0.0, commit_check_timeout=3.0,
            connect_deadline=0.2,
        ),
    )
    breaker = dbresilience._engine_hooks.resilience_of(engine).breaker
    assert breaker is not None
    with engine.connect() as conn:
        conn.execute(text("insert into ledger values (1)"))
        proxy.close_after(match=b"COMMIT")
        proxy.refuse()
        with pytest.raises(dbresilience.DatabaseUnavailable):
            engine.connect()  # the app's own connects open the breaker meanwhile
        assert breaker.state != "closed"
        back = threading.Timer(1.5, proxy.passthrough)
        back.start()
        conn.commit()  # resolved as committed once the server answers again
        join_all([back], timeout=10)
    assert get_stats(engine)["commit.committed"] == 1
    assert pg.execute("select id from ledger") == [(1,)]
    engine.dispose()


def test_commit_check_connection_closed_when_cancelled(pg: PostgresCluster) -> None:
    """asyncio: the task is cancelled while the check waits; nothing is left open."""
    pg.execute("create table ledger (id int primary key)")
    _slow_commit(pg, "ledger", seconds=3)

    async def main() -> None:
        with ChaosProxy(pg.host, pg.port) as proxy:
            engine = create_async_resilient_engine(pg.url(driver="asyncpg", port=proxy.port))

            async def write() -> None:
                async with engine.begin() as conn:
                    await conn.execute(text("insert into ledger values (1)"))
                    proxy.close_after(match=b"COMMIT")

            task = asyncio.create_task(write())
            # Until the check polls "in progress" (the COMMIT runs its 3 s trigger).
            deadline = time.monotonic() + 2.5
            while get_stats(engine).get("commit-check.polls", 0) == 0:
                assert time.monotonic() < deadline, "the commit check did not start"
                await asyncio.sleep(0.01)
            assert get_stats(engine).get("commit-check.connections") == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await engine.dispose()

    asyncio.run(main())
    checking = (
        "select count(*) from pg_stat_activity where pid <> pg_backend_pid() "
        "and query like '%pg_xact_status%'"
    )
    deadline = time.monotonic() + 5
    while pg.execute(checking) != [(0,)] and time.monotonic() < deadline:
        time.sleep(0.1)
    left = pg.execute(
        "select pid, state, backend_start, query from pg_stat_activity "
        "where pid <> pg_backend_pid() and query like '%pg_xact_status%'"
    )
    assert left == [], f"the checking connection was left open: {left}"


# -- after a restart: a crash may hand the lost transaction's xid out again --------------------


def test_commit_check_after_a_crash_never_trusts_a_reused_xid() -> None:
    # Production-like durability: WAL reaches the disk at COMMIT, not every 200 ms; so a crash
    # loses a transaction still running its COMMIT triggers, and its xid is handed out again.
    settings = {"synchronous_commit": "on", "wal_writer_delay": "10000ms"}
    with PostgresCluster(settings=settings) as pg, ChaosProxy(pg.host, pg.port) as proxy:
        _crash_during_commit_then_reuse(pg, proxy)


def _crash_during_commit_then_reuse(pg: PostgresCluster, proxy: ChaosProxy) -> None:
    pg.execute("create table orders (id int primary key)")
    pg.execute("create table other (id serial)")
    _slow_commit(pg, "orders", seconds=3)
    engine = create_resilient_engine(
        pg.url(port=proxy.port), policy=Policy(commit_check_timeout=20, attempts=1)
    )
    xids: dict[str, int] = {}

    def crash_then_reuse() -> None:
        # COMMIT is running the deferred trigger (3 s): seen on the server, however slow we are.
        if not _wait_until_running(pg, "COMMIT", within=10):
            return  # the test fails on the missing xid
        proxy.refuse()  # the commit check waits until the xid has been handed out again
        pg.stop("immediate")
        pg.start()
        with psycopg.connect(host=pg.host, port=pg.port, user="postgres", autocommit=True) as c:
            for _ in range(100):
                with c.transaction():
                    c.execute("insert into other default values")
                    row = c.execute("select pg_current_xact_id()::text").fetchone()
                assert row is not None
                if int(row[0]) >= xids["ours"]:
                    xids["reused"] = int(row[0])
                    break
        proxy.passthrough()

    def order(conn: Connection) -> None:
        conn.execute(text("insert into orders values (1)"))
        xids["ours"] = int(conn.execute(text("select pg_current_xact_id()::text")).scalar_one())

    faults = threading.Thread(target=crash_then_reuse)
    faults.start()
    with pytest.raises(dbresilience.CommitOutcomeUnknown):
        run_transaction(engine, order)
    join_all([faults], timeout=120, what="the crash and restart")
    assert xids.get("reused") == xids["ours"]  # the same xid committed another transaction
    assert pg.execute("select count(*) from orders") == [(0,)]
    assert get_stats(engine)["commit.unknown"] == 1
    engine.dispose()


def test_commit_check_after_a_clean_restart_still_verifies(
    pg: PostgresCluster, proxy: ChaosProxy
) -> None:
    pg.execute("create table orders (id int primary key)")
    engine = create_resilient_engine(
        pg.url(port=proxy.port), policy=Policy(commit_check_timeout=20)
    )

    def restart_cleanly() -> None:
        # Once the COMMIT's reply was lost and the check polls (refused meanwhile).
        deadline = time.monotonic() + 10
        while get_stats(engine).get("commit-check.polls", 0) == 0:
            if time.monotonic() > deadline:
                proxy.passthrough()
                return  # the test fails: the commit check never started
            time.sleep(0.01)
        pg.restart()  # fast shutdown: everything committed is on disk, no xid handed out again
        proxy.passthrough()

    with engine.connect() as conn:
        conn.execute(text("insert into orders values (1)"))
        proxy.close_after(match=b"COMMIT")  # committed; the reply is lost
        proxy.refuse()
        restart = threading.Thread(target=restart_cleanly)
        restart.start()
        conn.commit()  # verified after the restart: committed
        join_all([restart], timeout=120, what="the restart")
    assert pg.execute("select count(*) from orders") == [(1,)]
    assert get_stats(engine)["commit.committed"] == 1
    engine.dispose()


# -- the application's own exceptions raised inside SQLAlchemy's execution -----------------------


def test_app_exception_from_a_type_decorator_is_not_retried(shared_pg: PostgresCluster) -> None:
    from sqlalchemy import bindparam
    from sqlalchemy.types import String, TypeDecorator

    class Encrypted(TypeDecorator[str]):
        impl = String
        cache_ok = True

        def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
            raise ConnectionRefusedError(111, "key service refused")  # e.g. a KMS call

    engine = create_resilient_engine(shared_pg.url(), pool_size=3)
    with engine.connect() as conn:  # a pooled connection that must survive
        conn.execute(text("select 1"))
    calls = []

    def unit(conn: Connection) -> None:
        calls.append(1)
        conn.execute(
            text("select :v").bindparams(bindparam("v", type_=Encrypted())), {"v": "secret"}
        )

    with pytest.raises(exc.StatementError) as info:
        run_transaction(engine, unit)
    assert isinstance(info.value.orig, ConnectionRefusedError)
    assert not isinstance(info.value, dbresilience.ResilienceError)
    assert len(calls) == 1
    engine.dispose()


def test_app_exception_from_a_cursor_listener_is_not_retried(shared_pg: PostgresCluster) -> None:
    engine = create_resilient_engine(shared_pg.url(), pool_size=3)
    with engine.connect() as conn:
        conn.execute(text("select 1"))

    @event.listens_for(engine, "before_cursor_execute")
    def audit(*args: Any) -> None:
        raise TimeoutError("audit service: read timed out")

    calls = []

    def unit(conn: Connection) -> None:
        calls.append(1)
        conn.execute(text("select 1"))

    with pytest.raises(TimeoutError, match="audit service"):
        run_transaction(engine, unit)
    assert len(calls) == 1
    stats = get_stats(engine)
    assert "error.disconnect" not in stats and "dead.replaced" not in stats
    assert engine.pool.checkedin() >= 1  # the pool was not thrown away
    engine.dispose()


def test_creators_own_error_propagates_unchanged(shared_pg: PostgresCluster) -> None:
    def creator() -> Any:
        raise KeyError("DB_PASSWORD")

    engine = create_resilient_engine("postgresql+psycopg://", creator=creator)
    with pytest.raises(KeyError) as info:
        engine.connect()
    assert info.value.__cause__ is not info.value
    engine.dispose()


# -- the breaker across fork and testing ----------------------------------------------------------


def _child_connects(engine: Engine, conn: Any) -> None:
    try:
        engine.dispose(close=False)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 8:
            try:
                with engine.connect() as c:
                    c.execute(text("select 1"))
                conn.send(("ok", time.monotonic() - t0))
                return
            except Exception:
                time.sleep(0.05)
        conn.send(("never", time.monotonic() - t0))
    finally:
        conn.close()


def test_fork_while_a_breaker_probe_is_in_flight(pg: PostgresCluster, proxy: ChaosProxy) -> None:
    policy = Policy(breaker_failures=1, breaker_min_duration=0.0, connect_deadline=0.5)
    engine = create_resilient_engine(pg.url(port=proxy.port), policy=policy)
    breaker = dbresilience._engine_hooks.resilience_of(engine).breaker
    assert breaker is not None
    proxy.refuse()
    with pytest.raises(dbresilience.DatabaseUnavailable):
        engine.connect()
    proxy.blackhole()  # the next probe hangs in its connect

    def probe() -> None:  # hangs, then fails or (once the proxy passes again) succeeds
        with contextlib.suppress(Exception):
            engine.connect().close()

    prober = threading.Thread(target=probe)
    time.sleep(0.3)  # past the next probe slot (at most connect_wait_max away)
    probes = breaker.probes
    prober.start()
    deadline = time.monotonic() + 5
    while breaker.probes == probes and time.monotonic() < deadline:
        time.sleep(0.01)
    # Its probe is in flight: the slot is taken, everyone else fails fast.
    assert breaker.probes == probes + 1
    assert breaker.state == "half-open" and breaker.rejecting()
    child, parent_end = start_forked(_child_connects, engine)
    proxy.passthrough()
    try:
        outcome, took = result_of_forked(child, parent_end, timeout=15)
    finally:
        join_all([prober], timeout=10, what="the parent's probe")
    assert child.exitcode == 0, child.exitcode
    assert outcome == "ok", (outcome, took)  # the parent's probe does not hold the child's
    engine.dispose()


def test_set_testing_does_not_spin_against_a_server_that_is_down() -> None:
    from dbresilience.testing import free_port

    engine = create_resilient_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres",
        policy=Policy(breaker_failures=1, breaker_min_duration=0.0, deadline=2.0),
    )
    t0 = time.process_time()
    with dbresilience.set_testing(True), pytest.raises(dbresilience.DatabaseUnavailable):
        run_transaction(engine, lambda c: None)
    cpu = time.process_time() - t0
    fail_fast = get_stats(engine).get("breaker.fail_fast", 0)
    # Paced by the breaker's probe slots (<= 0.25 s apart), not a busy loop.
    assert fail_fast < 200, fail_fast
    assert cpu < 1.0, cpu
    engine.dispose()


async def _closed_mid_transaction(
    url: str, *, begin_listener: bool
) -> tuple[type[BaseException] | None, list[int]]:
    engine = create_async_resilient_engine(url)
    if begin_listener:
        # A common multi-tenant / RLS pattern: a per-transaction setting in a "begin"
        # listener, which SQLAlchemy runs before dialect.do_begin (found in review).
        @event.listens_for(engine.sync_engine, "begin")
        def _set_tenant(conn: Connection) -> None:
            conn.exec_driver_sql("select set_config('app.tenant', '42', true)")

    try:
        async with engine.connect() as conn:
            await conn.execute(text("drop table if exists closed_mid"))
            await conn.execute(text("create table closed_mid (id int)"))
            await conn.commit()
        raised: type[BaseException] | None = None
        async with engine.connect() as conn:
            await conn.execute(text("insert into closed_mid values (1)"))
            # What SQLAlchemy's own reconnect tests do: the DBAPI connection closed behind
            # its back, mid-transaction (asyncpg's adapter then forgets its transaction).
            await conn.run_sync(lambda c: c.connection.dbapi_connection.close())
            try:
                await conn.execute(text("insert into closed_mid values (2)"))
                await conn.commit()
            except Exception as exc:
                raised = type(exc)
                await conn.rollback()
        async with engine.connect() as conn:
            rows = (await conn.execute(text("select id from closed_mid order by id"))).all()
        return raised, [int(r[0]) for r in rows]
    finally:
        await engine.dispose()


@pytest.mark.parametrize("begin_listener", [False, True])
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_a_transaction_closed_mid_way_never_commits_its_second_half(
    shared_pg: PostgresCluster, driver: str, begin_listener: bool
) -> None:
    # The second statement must not be replayed on a new connection as if it began the
    # transaction: that would commit it without the first.
    url = shared_pg.url(driver)
    raised, rows = asyncio.run(_closed_mid_transaction(url, begin_listener=begin_listener))
    assert rows == [], rows
    assert raised is not None and issubclass(raised, exc.DBAPIError), raised
