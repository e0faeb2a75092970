"""Classification: every class of the taxonomy produced for real, plus the pure tables."""

from __future__ import annotations

import errno
import os
import signal
import socket
import ssl
import threading

import psycopg
import pytest
from _support import join_all, wait_readable
from sqlalchemy import Connection, Engine, exc, text

import dbresilience
from dbresilience import ErrorKind, Policy, classify, create_resilient_engine
from dbresilience.testing import PostgresCluster

# -- pure tables (no server needed) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), ErrorKind.UNAVAILABLE),
        (ConnectionResetError(errno.ECONNRESET, "reset by peer"), ErrorKind.DISCONNECT),
        (ConnectionResetError("[Errno 104] Connect call failed"), ErrorKind.UNAVAILABLE),
        (BrokenPipeError(errno.EPIPE, "broken pipe"), ErrorKind.DISCONNECT),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), ErrorKind.DISCONNECT),
        (socket.gaierror(-2, "Name or service not known"), ErrorKind.UNAVAILABLE),
        (ValueError("not a database error"), ErrorKind.APPLICATION),
    ],
)
def test_os_errors(error: BaseException, kind: ErrorKind) -> None:
    assert classify(error).kind is kind


class _PgLike(Exception):
    """Stands for a driver error carrying a SQLSTATE (as psycopg/asyncpg errors do)."""

    def __init__(self, sqlstate: str, message: str = "") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("sqlstate", "message", "kind"),
    [
        ("08006", "", ErrorKind.DISCONNECT),
        ("08001", "", ErrorKind.UNAVAILABLE),
        ("08007", "", ErrorKind.COMMIT_OUTCOME_UNKNOWN),
        ("40001", "", ErrorKind.TRANSACTION_CONFLICT),
        ("40P01", "", ErrorKind.TRANSACTION_CONFLICT),
        ("55P03", "", ErrorKind.TRANSACTION_CONFLICT),
        ("53300", "", ErrorKind.RESOURCE_EXHAUSTED),
        ("53200", "", ErrorKind.RESOURCE_EXHAUSTED),
        ("57P01", "", ErrorKind.DISCONNECT),
        ("57P02", "", ErrorKind.DISCONNECT),
        ("57P03", "", ErrorKind.UNAVAILABLE),
        ("57P05", "", ErrorKind.DISCONNECT),
        ("57014", "", ErrorKind.TIMEOUT),
        ("25006", "", ErrorKind.APPLICATION),  # a standby's is recognised by the engine
        ("28P01", "", ErrorKind.PERMANENT),
        ("28000", "", ErrorKind.PERMANENT),
        ("3D000", "", ErrorKind.PERMANENT),
        ("23505", "", ErrorKind.APPLICATION),
        ("08P01", "query_wait_timeout", ErrorKind.RESOURCE_EXHAUSTED),
        ("08P01", "no more connections allowed (max_client_conn)", ErrorKind.RESOURCE_EXHAUSTED),
        ("08P01", "pgbouncer cannot connect to server", ErrorKind.UNAVAILABLE),
        ("08P01", "client_idle_timeout", ErrorKind.DISCONNECT),
        ("08P01", "query_timeout", ErrorKind.TIMEOUT),
        ("08P01", "something else", ErrorKind.DISCONNECT),
        # asyncpg, when PgBouncer sent its error and closed the connection (PgBouncer 1.18)
        (
            "08003",
            "connection was closed in the middle of operation: server login has been failing, "
            "try again later (server_login_retry)",
            ErrorKind.UNAVAILABLE,
        ),
        ("08003", "connection was closed in the middle of operation", ErrorKind.DISCONNECT),
    ],
)
def test_sqlstate_table(sqlstate: str, message: str, kind: ErrorKind) -> None:
    found = classify(_PgLike(sqlstate, message))
    assert found.kind is kind
    assert found.sqlstate == sqlstate
    assert found.retryable is (
        kind
        in {
            ErrorKind.DISCONNECT,
            ErrorKind.UNAVAILABLE,
            ErrorKind.TRANSACTION_CONFLICT,
            ErrorKind.RESOURCE_EXHAUSTED,
        }
    )


def test_context_is_not_a_cause() -> None:
    """An error raised while handling another is classified by itself, not by its context."""
    try:
        try:
            raise _PgLike("57P01")
        except _PgLike:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "refused") from None
    except ConnectionRefusedError as e:
        assert classify(e).kind is ErrorKind.UNAVAILABLE


# -- real errors from a real server ---------------------------------------------------------


def _fileno(conn: Connection) -> int:
    """The socket of the psycopg connection under ``conn``."""
    dbapi = conn.connection.dbapi_connection
    assert isinstance(dbapi, psycopg.Connection)
    return int(dbapi.pgconn.socket)


def _classified(engine: Engine, *statements: str) -> dbresilience.ResilienceError:
    with pytest.raises(exc.DBAPIError) as info, engine.begin() as conn:
        for s in statements:
            conn.execute(text(s))
    err = info.value
    assert isinstance(err, dbresilience.ResilienceError), type(err).__mro__
    return err


def test_real_statement_timeout(shared_pg: PostgresCluster) -> None:
    engine = create_resilient_engine(shared_pg.url())
    err = _classified(engine, "set local statement_timeout = 50", "select pg_sleep(2)")
    assert isinstance(err, dbresilience.StatementTimeout)
    assert isinstance(err, exc.OperationalError)
    assert err.sqlstate == "57014" and not err.retryable
    engine.dispose()


def test_real_read_only_transaction_on_a_primary_is_the_apps(shared_pg: PostgresCluster) -> None:
    engine = create_resilient_engine(shared_pg.url())
    with pytest.raises(exc.DBAPIError) as info, engine.begin() as conn:
        conn.execute(text("set transaction read only"))
        conn.execute(text("create table if not exists ro (x int)"))
    err = info.value
    assert not isinstance(err, dbresilience.ResilienceError)
    assert isinstance(err, exc.InternalError)
    assert classify(err).kind is ErrorKind.APPLICATION and not classify(err).retryable
    engine.dispose()


def test_real_lock_not_available(shared_pg: PostgresCluster) -> None:
    shared_pg.execute("create table if not exists locked (x int)")
    engine = create_resilient_engine(shared_pg.url())
    with engine.begin() as holder:
        holder.execute(text("lock table locked in access exclusive mode"))
        err = _classified(engine, "lock table locked in access exclusive mode nowait")
    assert isinstance(err, dbresilience.TransactionConflict)
    assert err.sqlstate == "55P03"
    engine.dispose()


def test_real_serialization_failure(shared_pg: PostgresCluster) -> None:
    shared_pg.execute("create table if not exists ser (id int primary key, v int)")
    shared_pg.execute("insert into ser values (1, 0) on conflict do nothing")
    engine = create_resilient_engine(shared_pg.url())
    iso = {"isolation_level": "REPEATABLE READ"}
    with engine.connect().execution_options(**iso) as a, engine.connect() as b:
        a.execute(text("select v from ser where id = 1")).scalar_one()
        b.execute(text("update ser set v = v + 1 where id = 1"))
        b.commit()
        with pytest.raises(exc.OperationalError) as info:
            a.execute(text("update ser set v = v + 1 where id = 1"))
        a.rollback()
    assert isinstance(info.value, dbresilience.TransactionConflict)
    assert info.value.sqlstate == "40001" and info.value.retryable
    engine.dispose()


def test_real_deadlock(shared_pg: PostgresCluster) -> None:
    shared_pg.execute("create table if not exists dl (id int primary key)")
    shared_pg.execute("insert into dl values (1), (2) on conflict do nothing")
    engine = create_resilient_engine(shared_pg.url())
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(first: int, second: int) -> None:
        try:
            with engine.begin() as conn:
                conn.execute(text("set local deadlock_timeout = '50ms'"))
                conn.execute(text(f"select * from dl where id = {first} for update"))
                barrier.wait(timeout=5)
                conn.execute(text(f"select * from dl where id = {second} for update"))
        except exc.DBAPIError as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=a) for a in ((1, 2), (2, 1))]
    for t in threads:
        t.start()
    join_all(threads, timeout=10)
    assert len(errors) == 1
    assert isinstance(errors[0], dbresilience.TransactionConflict)
    assert errors[0].sqlstate == "40P01"
    engine.dispose()


def test_real_too_many_connections() -> None:
    with PostgresCluster(
        settings={
            "max_connections": "3",
            "superuser_reserved_connections": "0",
            "reserved_connections": "0",
        }
    ) as pg:
        holders = [psycopg.connect(pg.url().replace("+psycopg", "")) for _ in range(3)]
        engine = create_resilient_engine(pg.url(), policy=Policy(connect_deadline=0.3))
        try:
            with pytest.raises(dbresilience.ResourceExhausted) as info:
                engine.connect()
            assert isinstance(info.value, exc.OperationalError)
            assert dbresilience.get_stats(engine)["retry.connect.resource-exhausted"] >= 1
        finally:
            for h in holders:
                h.close()
            engine.dispose()


def test_real_idle_session_timeout(shared_pg: PostgresCluster) -> None:
    engine = create_resilient_engine(shared_pg.url(), policy=Policy(replay_first_statement=False))
    with engine.connect() as conn:
        conn.execute(text("set idle_session_timeout = 100"))
        conn.commit()
        wait_readable(_fileno(conn))  # the server's FATAL, 100 ms on (later when it is busy)
        with pytest.raises(dbresilience.DisconnectError) as info:
            conn.execute(text("select 1"))
    assert info.value.sqlstate == "57P05"
    engine.dispose()


def test_real_idle_in_transaction_timeout(shared_pg: PostgresCluster) -> None:
    engine = create_resilient_engine(shared_pg.url())
    with engine.connect() as conn:
        conn.execute(text("set idle_in_transaction_session_timeout = 100"))
        conn.commit()
        conn.execute(text("select 1"))
        wait_readable(_fileno(conn))  # the server's FATAL, 100 ms on (later when it is busy)
        with pytest.raises(dbresilience.DisconnectError) as info:
            conn.execute(text("select 2"))
    assert info.value.sqlstate == "25P03"
    engine.dispose()


def test_real_crash_of_another_backend(pg: PostgresCluster) -> None:
    """SIGKILL of one backend makes the postmaster kill all others with 57P02."""
    # No replay and no socket check before the statement (a window of an hour): the error
    # itself must reach us.
    policy = Policy(replay_first_statement=False, liveness_window=3600)
    engine = create_resilient_engine(pg.url(), policy=policy)
    with engine.connect() as victim, engine.connect() as bystander:
        victim_pid = victim.execute(text("select pg_backend_pid()")).scalar_one()
        bystander.execute(text("select 1"))
        bystander.commit()
        os.kill(victim_pid, signal.SIGKILL)
        # The postmaster then kills every other backend: wait for the bystander's FATAL/EOF.
        wait_readable(_fileno(bystander))
        with pytest.raises(dbresilience.DisconnectError) as info:
            bystander.execute(text("select 1"))
    assert info.value.sqlstate in ("57P02", None)  # 57P02, or EOF if the socket closed first
    engine.dispose()


def test_real_reset_through_chaos_proxy(pg: PostgresCluster) -> None:
    from dbresilience.testing import ChaosProxy

    with ChaosProxy(pg.host, pg.port) as proxy:
        engine = create_resilient_engine(pg.url(port=proxy.port))
        with engine.connect() as conn:
            conn.execute(text("select 1"))
            assert proxy.reset_all() == 1
            with pytest.raises(dbresilience.DisconnectError) as info:
                conn.execute(text("select 2"))  # mid-transaction: not replayable
        assert isinstance(info.value, exc.OperationalError)
        assert info.value.connection_invalidated
        engine.dispose()


def test_real_refused_connections_through_chaos_proxy(pg: PostgresCluster) -> None:
    from dbresilience.testing import ChaosProxy

    with ChaosProxy(pg.host, pg.port) as proxy:
        engine = create_resilient_engine(
            pg.url(port=proxy.port), policy=Policy(connect_deadline=0.5)
        )
        proxy.refuse()
        with pytest.raises(dbresilience.ResilienceError) as info:
            engine.connect()
        assert info.value.classification.kind in (ErrorKind.UNAVAILABLE, ErrorKind.DISCONNECT)
        assert dbresilience.get_stats(engine)["retry.connect"] >= 1
        proxy.passthrough()
        with engine.connect() as conn:
            assert conn.execute(text("select 1")).scalar_one() == 1
        engine.dispose()


def test_application_errors_pass_through_unwrapped(shared_pg: PostgresCluster) -> None:
    engine = create_resilient_engine(shared_pg.url())
    with pytest.raises(exc.ProgrammingError) as info, engine.connect() as conn:
        conn.execute(text("select * from no_such_table"))
    assert not isinstance(info.value, dbresilience.ResilienceError)
    assert classify(info.value).kind is ErrorKind.APPLICATION
    engine.dispose()


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("connection socket closed", ErrorKind.DISCONNECT),  # psycopg waiting.py, seen in a storm
        ("consuming input failed: server closed the connection unexpectedly", ErrorKind.DISCONNECT),
        (
            "connection failed: ... FATAL:  sorry, too many clients already",
            ErrorKind.RESOURCE_EXHAUSTED,
        ),
        (
            'connection failed: ... FATAL:  password authentication failed for user "x"',
            ErrorKind.PERMANENT,
        ),
        (
            "connection failed: ... FATAL:  the database system is starting up",
            ErrorKind.UNAVAILABLE,
        ),
    ],
)
def test_psycopg_messages_without_sqlstate(message: str, kind: ErrorKind) -> None:
    assert classify(psycopg.OperationalError(message)).kind is kind
