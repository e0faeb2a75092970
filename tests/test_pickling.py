"""Errors from real faults pickle and unpickle to the very same classes, across processes too."""

from __future__ import annotations

import asyncio
import multiprocessing
import pickle
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest
from sqlalchemy import exc, make_url, text

import dbresilience
from dbresilience import Policy, create_async_resilient_engine, create_resilient_engine
from dbresilience._errors import error_class_for
from dbresilience.testing import PostgresCluster, free_port

DRIVERS = ("psycopg", "asyncpg")
TERMINATE_SELF = "select pg_terminate_backend(pg_backend_pid())"
# Nothing listens on the port: the breaker opens at the first refused connect, and its first
# probe slot is up to 10 min away (full jitter): the engine's next call fails fast with
# CircuitOpen, however slow the first one was (see BREAKER_RUNS).
BREAKER = Policy(
    connect_deadline=0.5,
    breaker_failures=1,
    breaker_min_duration=0,
    connect_wait_initial=600,
    connect_wait_max=600,
)
# The first run opens the breaker (it may end in CircuitOpen, or in DatabaseUnavailable
# when its refused connect outlasts connect_deadline on a loaded machine); the second is
# rejected by it.
BREAKER_RUNS = 2
NO_BREAKER = Policy(connect_deadline=0.5, circuit_breaker=False)


def failure(
    url: str,
    *statements: str,
    policy: Policy | None = None,
    isolation_level: str = "READ COMMITTED",
    after_first: Callable[[], object] | None = None,
    runs: int = 1,
) -> Exception:
    """Run ``statements`` in one transaction of a new resilient engine (psycopg, or asyncpg in
    ``asyncio.run``) ``runs`` times and return what the last run raised; ``after_first`` runs
    after the first statement."""
    if make_url(url).get_driver_name() == "asyncpg":
        return asyncio.run(
            _async_failure(url, statements, policy, isolation_level, after_first, runs)
        )
    engine = create_resilient_engine(url, policy=policy, isolation_level=isolation_level)
    errors: list[Exception] = []
    try:
        for _ in range(runs):
            try:
                with engine.begin() as conn:
                    for n, sql in enumerate(statements):
                        conn.execute(text(sql))
                        if n == 0 and after_first is not None:
                            after_first()
            except Exception as error:
                errors.append(error)
    finally:
        engine.dispose()
    if len(errors) < runs:
        raise AssertionError(f"no error from {statements}")
    return errors[-1]


async def _async_failure(
    url: str,
    statements: tuple[str, ...],
    policy: Policy | None,
    isolation_level: str,
    after_first: Callable[[], object] | None,
    runs: int,
) -> Exception:
    engine = create_async_resilient_engine(url, policy=policy, isolation_level=isolation_level)
    errors: list[Exception] = []
    try:
        for _ in range(runs):
            try:
                async with engine.begin() as conn:
                    for n, sql in enumerate(statements):
                        await conn.execute(text(sql))
                        if n == 0 and after_first is not None:
                            after_first()
            except Exception as error:
                errors.append(error)
    finally:
        await engine.dispose()
    if len(errors) < runs:
        raise AssertionError(f"no error from {statements}")
    return errors[-1]


def assert_same(copy: BaseException, error: BaseException, ours: type[Exception]) -> None:
    """``copy`` is ``error`` rebuilt: same class, message, ``.orig`` and attributes."""
    assert type(copy) is type(error)
    assert isinstance(copy, ours)
    assert str(copy) == str(error)
    if isinstance(error, dbresilience.ResilienceError):
        assert isinstance(copy, dbresilience.ResilienceError)
        assert isinstance(error, exc.DBAPIError) and isinstance(copy, exc.DBAPIError)
        assert copy.classification == error.classification
        assert copy.connection_invalidated == error.connection_invalidated
        assert type(copy.orig) is type(error.orig)
        assert str(copy.orig) == str(error.orig)
        assert (copy.__cause__ is copy.orig) == (error.__cause__ is error.orig)
        assert getattr(copy, "retry_after", None) == getattr(error, "retry_after", None)


def assert_round_trips(
    error: BaseException, ours: type[Exception], theirs: type[Exception]
) -> None:
    """``error`` is of both classes and unpickles to the very same class, whatever protocol."""
    assert isinstance(error, ours) and isinstance(error, theirs)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        copy = pickle.loads(pickle.dumps(error, protocol))
        assert_same(copy, error, ours)
        assert isinstance(copy, theirs)


def _sqlalchemy_keeps_asyncpg_errors() -> bool:
    import sqlalchemy

    return tuple(int(p) for p in sqlalchemy.__version__.split(".")[:3]) >= (2, 0, 30)


@pytest.mark.parametrize("driver", DRIVERS)
def test_disconnect_error(shared_pg: PostgresCluster, driver: str) -> None:
    # The second statement of the transaction: lost with it, never replayed.
    error = failure(shared_pg.url(driver), "select 1", TERMINATE_SELF)
    assert_round_trips(error, dbresilience.DisconnectError, exc.OperationalError)
    assert isinstance(error, exc.OperationalError) and error.connection_invalidated
    if driver == "asyncpg":  # .orig is SQLAlchemy's emulated DBAPI error, holding asyncpg's
        asyncpg_error = getattr(error.orig, "orig", None)
        copied = getattr(pickle.loads(pickle.dumps(error)).orig, "orig", None)
        # SQLAlchemy's adapter keeps asyncpg's exception as .orig (not in 2.0.16, the oldest
        # we support: there it is only the __cause__, which pickling drops for any exception).
        if asyncpg_error is not None or _sqlalchemy_keeps_asyncpg_errors():
            assert type(asyncpg_error).__module__.startswith("asyncpg")
            assert type(copied) is type(asyncpg_error) and str(copied) == str(asyncpg_error)


@pytest.mark.parametrize("driver", DRIVERS)
def test_transaction_conflict(shared_pg: PostgresCluster, driver: str) -> None:
    table = f"pickled_{driver}"
    shared_pg.execute(f"drop table if exists {table}; create table {table} (x int)")
    shared_pg.execute(f"insert into {table} values (0)")
    error = failure(
        shared_pg.url(driver),
        f"select x from {table}",  # takes the snapshot
        f"update {table} set x = x + 1",  # 40001: the row changed since
        isolation_level="REPEATABLE READ",
        after_first=lambda: shared_pg.execute(f"update {table} set x = x + 1"),
    )
    assert_round_trips(error, dbresilience.TransactionConflict, exc.DBAPIError)
    assert isinstance(error, dbresilience.TransactionConflict) and error.sqlstate == "40001"
    shared_pg.execute(f"drop table {table}")


@pytest.mark.parametrize("driver", DRIVERS)
def test_permanent_error(shared_pg: PostgresCluster, driver: str) -> None:
    error = failure(shared_pg.url(driver, database="no_such_db"), "select 1")
    assert_round_trips(error, dbresilience.PermanentError, exc.OperationalError)


@pytest.mark.parametrize("driver", DRIVERS)
def test_database_unavailable(shared_pg: PostgresCluster, driver: str) -> None:
    url = shared_pg.url(driver, port=free_port())
    error = failure(url, "select 1", policy=NO_BREAKER)
    assert_round_trips(error, dbresilience.DatabaseUnavailable, exc.OperationalError)
    assert not isinstance(error, dbresilience.CircuitOpen)


@pytest.mark.parametrize("driver", DRIVERS)
def test_circuit_open(shared_pg: PostgresCluster, driver: str) -> None:
    url = shared_pg.url(driver, port=free_port())
    error = failure(url, "select 1", policy=BREAKER, runs=BREAKER_RUNS)
    assert_round_trips(error, dbresilience.CircuitOpen, exc.OperationalError)
    assert getattr(error, "retry_after", 0) > 0
    assert "circuit breaker open" in str(error)


def test_configuration_error() -> None:
    with pytest.raises(dbresilience.ConfigurationError) as raised:
        create_resilient_engine("postgresql+psycopg://app:secret@db:not-a-port/app")
    assert_round_trips(raised.value, dbresilience.ConfigurationError, exc.ArgumentError)


# -- across processes ----------------------------------------------------------------------


def raise_disconnect(url: str) -> None:
    """In the child: raise the DisconnectError of its own engine."""
    raise failure(url, "select 1", TERMINATE_SELF)


def circuit_open(url: str) -> Exception:
    """In the child: return the CircuitOpen error of its own engine."""
    return failure(url, "select 1", policy=BREAKER, runs=BREAKER_RUNS)


def echo(error: BaseException) -> BaseException:
    """In the child: send back what was received."""
    return error


@pytest.fixture(scope="module")
def child() -> Iterator[ProcessPoolExecutor]:
    """A spawned process: a fresh interpreter that has made none of the combined classes."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


@pytest.mark.parametrize("driver", DRIVERS)
def test_error_raised_in_a_child_process(
    shared_pg: PostgresCluster, child: ProcessPoolExecutor, driver: str
) -> None:
    url = shared_pg.url(driver)
    with pytest.raises(dbresilience.DisconnectError) as raised:
        child.submit(raise_disconnect, url).result(timeout=60)
    error = raised.value
    assert type(error) is error_class_for(dbresilience.DisconnectError, exc.OperationalError)
    assert type(error) is type(failure(url, "select 1", TERMINATE_SELF))
    assert isinstance(error, dbresilience.DisconnectError)
    assert error.classification.kind is dbresilience.ErrorKind.DISCONNECT


@pytest.mark.parametrize("driver", DRIVERS)
def test_error_returned_by_a_child_process(
    shared_pg: PostgresCluster, child: ProcessPoolExecutor, driver: str
) -> None:
    url = shared_pg.url(driver, port=free_port())
    error = child.submit(circuit_open, url).result(timeout=60)
    assert type(error) is error_class_for(dbresilience.CircuitOpen, exc.OperationalError)
    assert type(error) is type(failure(url, "select 1", policy=BREAKER, runs=BREAKER_RUNS))
    assert getattr(error, "retry_after", 0) > 0
    assert "circuit breaker open" in str(error)


@pytest.mark.parametrize("driver", DRIVERS)
def test_error_sent_to_a_child_process_and_back(
    shared_pg: PostgresCluster, child: ProcessPoolExecutor, driver: str
) -> None:
    error = failure(shared_pg.url(driver), "select 1", TERMINATE_SELF)
    assert_same(child.submit(echo, error).result(timeout=60), error, dbresilience.DisconnectError)
