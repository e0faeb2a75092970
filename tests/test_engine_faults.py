"""The resilient engine under real faults on a real server."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from _support import join_all
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    Table,
    create_engine,
    event,
    exc,
    insert,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Session

import dbresilience
from dbresilience import Policy, create_resilient_engine, get_stats
from dbresilience.testing import PostgresCluster


def _pid(conn: object) -> int:
    return int(conn.execute(text("select pg_backend_pid()")).scalar_one())  # type: ignore[attr-defined]


# The liveness window, set for the path under test: whether a checkout vets a connection must
# not depend on how soon after the fault the test gets round to it (a loaded machine is slow).
# terminate_backends() returns once the backends have exited, their FATAL on our sockets.
REPLAY = Policy(liveness_window=3600)  # checkouts trust their connection: the statement finds out
VET = Policy(liveness_window=0)  # every checkout runs the zero-round-trip socket check


def test_engine_is_a_real_sqlalchemy_engine(engine: Engine) -> None:
    assert isinstance(engine, Engine)
    with engine.connect() as conn:
        assert conn.execute(text("select 41 + 1")).scalar_one() == 42


def test_killed_idle_connection_is_replaced_transparently_within_window(
    pg: PostgresCluster,
) -> None:
    engine = create_resilient_engine(pg.url(), policy=REPLAY)
    with engine.connect() as conn:
        first = _pid(conn)
    assert pg.terminate_backends() == 1
    with engine.begin() as conn:  # within the window: not vetted, the statement is replayed
        second = _pid(conn)
    assert second != first
    stats = get_stats(engine)
    assert stats["replay.statement"] == 1
    assert stats.get("dead.replaced", 0) == 0
    assert stats.get("error.disconnect", 0) == 0
    engine.dispose()


def test_killed_idle_connection_is_caught_before_use_after_window(pg: PostgresCluster) -> None:
    engine = create_resilient_engine(pg.url(), policy=VET)
    with engine.connect() as conn:
        first = _pid(conn)
    pg.terminate_backends()
    with engine.connect() as conn:  # past the window: the zero-round-trip check runs
        assert _pid(conn) != first
    stats = get_stats(engine)
    assert stats["dead.replaced"] == 1
    assert stats.get("replay.statement", 0) == 0
    engine.dispose()


def test_stale_check_survives_dispose(pg: PostgresCluster) -> None:
    # dispose() gives the engine a new pool: it must be vetted like the first one.
    engine = create_resilient_engine(pg.url(), policy=VET)
    engine.dispose()
    with engine.connect() as conn:
        first = _pid(conn)
    pg.terminate_backends()
    with engine.connect() as conn:
        assert _pid(conn) != first
    assert get_stats(engine)["dead.replaced"] == 1
    engine.dispose()


def test_connection_replaced_at_checkout_is_checked_again_next_time(pg: PostgresCluster) -> None:
    # The last-use stamp must survive the reconnect of the pool's record, or the new
    # connection would skip the check at its next checkout. AUTOCOMMIT and not idempotent:
    # never replayed, so a dead connection that escaped the check would raise. A window of
    # 0.2 s, waited out after each kill: a lost stamp would read as "just used" and skip it.
    window = 0.2
    engine = create_resilient_engine(
        pg.url(), pool_size=1, max_overflow=0, policy=Policy(liveness_window=window)
    )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        _pid(conn)
    for killed in (1, 2):
        pg.terminate_backends()
        time.sleep(window)  # at least that long since the last checkout, however slow we are
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            _pid(conn)
        assert get_stats(engine)["dead.replaced"] == killed
    engine.dispose()


def test_error_of_a_replayed_statement_is_not_chained_to_the_disconnect(
    pg: PostgresCluster,
) -> None:
    engine = create_resilient_engine(pg.url(), pool_size=1, max_overflow=0)
    pg.execute("create table u (id int primary key)")
    pg.execute("insert into u values (1)")
    with engine.connect() as conn:
        conn.execute(text("select 1"))
        conn.commit()
        pg.terminate_backends()  # a held connection: no checkout, the statement finds out
        with pytest.raises(exc.IntegrityError) as raised:
            conn.execute(text("insert into u values (1)"))  # replayed, then a real conflict
    assert get_stats(engine)["replay.statement"] == 1
    chain: list[BaseException] = []
    error: BaseException | None = raised.value.orig
    while error is not None and error not in chain:  # a cycle ends the walk, never spins
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert not any("terminat" in str(e) for e in chain), chain
    engine.dispose()


def test_users_do_execute_listeners_still_run(engine: Engine) -> None:
    seen: list[str] = []

    @event.listens_for(engine, "do_execute")
    def record(cursor: object, statement: str, parameters: object, context: object) -> None:
        seen.append(statement)  # returns None: SQLAlchemy then executes the statement itself

    with engine.connect() as conn:
        assert conn.execute(text("select 7")).scalar_one() == 7
    assert seen[-1] == "select 7"


def test_orm_flush_of_several_rows_after_an_idle_kill_is_transparent(pg: PostgresCluster) -> None:
    # A multi-row INSERT .. RETURNING (SQLAlchemy's insertmanyvalues) as the first statement:
    # SQLAlchemy keeps using the cursor it made, so the dead connection must be replaced before
    # that cursor exists, i.e. at checkout.
    engine = create_resilient_engine(pg.url(), policy=VET)
    with engine.begin() as conn:
        conn.execute(text("create table flushed (id serial primary key, x int)"))
    metadata = MetaData()
    flushed = Table(
        "flushed", metadata, Column("id", Integer, primary_key=True), Column("x", Integer)
    )

    class Base(DeclarativeBase):
        pass

    class Row(Base):
        __table__ = flushed

    pg.terminate_backends()
    with Session(engine) as session:
        rows = [Row(x=i) for i in range(3)]
        session.add_all(rows)
        session.commit()
        assert sorted(row.id for row in rows) == [1, 2, 3]
    assert pg.execute("select count(*) from flushed")[0][0] == 3
    assert get_stats(engine)["dead.replaced"] == 1
    engine.dispose()


def test_multi_row_insert_returning_is_never_replayed(pg: PostgresCluster) -> None:
    # On a held connection (no checkout in between) the dead connection is found only by the
    # statement itself. Replaying a batch on a new cursor would commit rows whose RETURNING
    # SQLAlchemy then reads from the old cursor: the error must surface instead.
    engine = create_resilient_engine(pg.url())
    metadata = MetaData()
    batch = Table("batch", metadata, Column("id", Integer, primary_key=True), Column("x", Integer))
    metadata.create_all(engine)
    with engine.connect() as conn:
        conn.execute(text("select 1"))
        conn.commit()
        pg.terminate_backends()
        with pytest.raises(dbresilience.DisconnectError):
            conn.execute(insert(batch).returning(batch.c.id), [{"x": 1}, {"x": 2}, {"x": 3}])
    assert pg.execute("select count(*) from batch")[0][0] == 0
    assert get_stats(engine).get("replay.statement", 0) == 0
    engine.dispose()


def test_replay_keeps_the_reset_of_connection_characteristics(pg: PostgresCluster) -> None:
    # The replayed statement runs on a new connection with the checkout's isolation level;
    # SQLAlchemy must still reset it at checkin, or the next user of the pool inherits it.
    engine = create_resilient_engine(pg.url(), pool_size=1, max_overflow=0, policy=REPLAY)
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    pg.terminate_backends()  # within the window: the statement finds out, and is replayed
    with engine.connect().execution_options(isolation_level="SERIALIZABLE") as conn:
        level = conn.execute(text("show transaction_isolation")).scalar_one()
        assert level == "serializable"
    assert get_stats(engine)["replay.statement"] == 1
    with engine.connect() as conn:
        assert conn.execute(text("show transaction_isolation")).scalar_one() == "read committed"
    engine.dispose()


def test_connection_closed_by_a_moot_rollback_is_replaced_at_next_checkout(
    pg: PostgresCluster, engine: Engine
) -> None:
    with engine.connect() as conn:
        first = _pid(conn)
        pg.terminate_backends()  # the backend is gone before the rollback at the end of the block
        # That rollback ends the transaction on a dead connection: moot, so no error; the pool
        # must not hand the closed connection out again.
    with engine.connect() as conn:
        assert _pid(conn) != first
    stats = get_stats(engine)
    assert stats["rollback.on_dead_connection"] == 1
    assert stats.get("error.disconnect", 0) == 0


def test_kill_mid_transaction_raises_classified_error_and_connection_recovers(
    pg: PostgresCluster, engine: Engine
) -> None:
    with engine.connect() as conn:
        conn.execute(text("create table t (x int)"))
        conn.commit()
    with pytest.raises(exc.OperationalError) as info, engine.begin() as conn:
        conn.execute(text("insert into t values (1)"))
        pg.terminate_backends()
        conn.execute(text("insert into t values (2)"))
    err = info.value
    assert isinstance(err, dbresilience.DisconnectError)
    assert err.classification.sqlstate == "57P01"
    assert err.retryable
    assert err.connection_invalidated
    assert err.orig is not None and err.__cause__ is err.orig
    # Nothing of the lost transaction committed, and the engine works again.
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from t")).scalar_one() == 0


def test_caller_connection_stays_usable_after_replay(pg: PostgresCluster, engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("select 1"))
        conn.commit()
        pg.terminate_backends()
        # Same Connection object, new transaction: its first statement is replayed.
        assert conn.execute(text("select 2")).scalar_one() == 2
        conn.execute(text("create table u (x int)"))
        conn.commit()
    assert get_stats(engine)["replay.statement"] == 1


def test_isolation_level_survives_replay(pg: PostgresCluster, engine: Engine) -> None:
    with engine.connect().execution_options(isolation_level="SERIALIZABLE") as conn:
        conn.execute(text("select 1"))
        conn.rollback()
        pg.terminate_backends()
        level = conn.execute(text("show transaction_isolation")).scalar_one()
        conn.rollback()
    assert level == "serializable"
    assert get_stats(engine)["replay.statement"] == 1


def test_autocommit_write_is_not_replayed(pg: PostgresCluster, engine: Engine) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("create table w (x int)"))
        pg.terminate_backends()
        with pytest.raises(dbresilience.DisconnectError):
            conn.execute(text("insert into w values (1)"))
    assert get_stats(engine).get("replay.statement", 0) == 0


def test_autocommit_statement_marked_idempotent_is_replayed(
    pg: PostgresCluster, engine: Engine
) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("select 1"))
        pg.terminate_backends()
        value = conn.execution_options(dbresilience_idempotent=True).execute(text("select 3"))
        assert value.scalar_one() == 3
    assert get_stats(engine)["replay.statement"] == 1


def test_restart_is_ridden_out(pg: PostgresCluster, engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    pg.restart(down_for=1.0)
    with engine.begin() as conn:
        assert conn.execute(text("select 1")).scalar_one() == 1


def test_connect_waits_for_a_server_that_comes_back(pg: PostgresCluster, engine: Engine) -> None:
    pg.stop()
    starter = threading.Timer(1.0, pg.start)
    starter.start()
    t0 = time.monotonic()
    try:
        with engine.connect() as conn:
            assert conn.execute(text("select 1")).scalar_one() == 1
    finally:
        join_all([starter], timeout=70, what="pg_ctl start")
    elapsed = time.monotonic() - t0
    assert 0.9 < elapsed < Policy().connect_deadline
    assert get_stats(engine)["retry.connect.unavailable"] >= 1


def test_server_down_longer_than_deadline_raises_unavailable_in_bounded_time(
    pg: PostgresCluster,
) -> None:
    engine = create_resilient_engine(pg.url(), policy=Policy(connect_deadline=1.5))
    pg.stop()
    t0 = time.monotonic()
    with pytest.raises(exc.OperationalError) as info:
        engine.connect()
    elapsed = time.monotonic() - t0
    assert isinstance(info.value, dbresilience.DatabaseUnavailable)
    assert info.value.classification.kind is dbresilience.ErrorKind.UNAVAILABLE
    assert 1.0 < elapsed < 1.5 + Policy().connect_timeout
    engine.dispose()


def test_auth_failure_is_never_retried(pg: PostgresCluster) -> None:
    engine = create_resilient_engine(pg.url(user="nobody"))
    t0 = time.monotonic()
    with pytest.raises(dbresilience.PermanentError) as info:
        engine.connect()
    assert isinstance(info.value, exc.OperationalError)
    assert time.monotonic() - t0 < 1.0
    assert get_stats(engine).get("retry.connect", 0) == 0


def test_missing_database_is_never_retried(pg: PostgresCluster) -> None:
    engine = create_resilient_engine(pg.url(database="nope"))
    with pytest.raises(dbresilience.PermanentError):
        engine.connect()
    assert get_stats(engine).get("retry.connect", 0) == 0


def test_install_on_existing_engine(pg: PostgresCluster) -> None:
    engine = create_engine(pg.url())
    assert dbresilience.install(engine).policy == Policy()
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    pg.terminate_backends()
    with engine.connect() as conn:
        assert conn.execute(text("select 1")).scalar_one() == 1
    # Either path, as the checkout came before or after the default 0.5 s window: the dead
    # connection was replaced once, and no error reached the caller.
    stats = get_stats(engine)
    assert stats.get("replay.statement", 0) + stats.get("dead.replaced", 0) == 1
    assert stats.get("error.disconnect", 0) == 0
    engine.dispose()
    # install() with a policy: the path it sets is the one taken.
    engine = create_engine(pg.url())
    dbresilience.install(engine, REPLAY)
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    pg.terminate_backends()
    with engine.connect() as conn:
        assert conn.execute(text("select 1")).scalar_one() == 1
    assert get_stats(engine)["replay.statement"] == 1
    engine.dispose()


def test_password_never_in_logs_or_errors(
    pg: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cr3t-Pa55"
    engine = create_resilient_engine(pg.url(password=secret), policy=Policy(connect_deadline=0.5))
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    pg.stop()
    caplog.set_level(logging.DEBUG, logger="dbresilience")
    with pytest.raises(dbresilience.DatabaseUnavailable) as info, engine.connect() as conn:
        conn.execute(text("select 1"))
    assert caplog.records, "retries must be logged"
    assert secret not in caplog.text
    assert secret not in str(info.value)
    assert secret not in repr(get_stats(engine))
    assert secret not in dbresilience._engine_hooks.resilience_of(engine).name
    engine.dispose()
