"""Retry hooks (``add_hook`` / ``RetryDetails``) and ``set_testing(attempts=)`` against a real
server: the retries come from real backend kills and real refused connections, never mocks."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Connection, Engine, text

import dbresilience
from dbresilience import (
    ErrorKind,
    Policy,
    RetryDetails,
    add_hook,
    create_resilient_engine,
    get_stats,
    remove_hook,
    run_transaction,
    set_testing,
)
from dbresilience.testing import PostgresCluster, free_port

SECRET = "hook-s3cret"  # in the URL (trust authentication ignores it): never in the details


@pytest.fixture
def seen() -> Iterator[list[RetryDetails]]:
    """The details every retry hands to a registered hook, for this test only."""
    details: list[RetryDetails] = []
    hook = details.append
    add_hook(hook)
    try:
        yield details
    finally:
        remove_hook(hook)


def _engine(pg: PostgresCluster, app: str, policy: Policy | None = None) -> Engine:
    """A resilient engine whose sessions (tagged ``app``) can be killed on the shared server."""
    return create_resilient_engine(
        pg.url(password=SECRET), policy=policy, connect_args={"application_name": app}
    )


def _kill_own_backend(conn: Connection) -> None:
    """The second statement of the transaction kills its own backend: never replayed."""
    conn.execute(text("select 1"))
    conn.execute(text("select pg_terminate_backend(pg_backend_pid())"))


def test_hook_gets_the_details_of_a_transaction_retry(
    shared_pg: PostgresCluster, seen: list[RetryDetails]
) -> None:
    engine = _engine(shared_pg, "hook_txn")
    calls = []

    def unit(conn: Connection) -> int:
        calls.append(1)
        conn.execute(text("select 1"))
        if len(calls) == 1:
            assert shared_pg.terminate_backends(application_name="hook_txn") == 1
            conn.execute(text("select 2"))  # the backend is gone: the transaction is lost
        return 7

    policy = Policy(wait_initial=0.01, wait_max=0.02)
    assert run_transaction(engine, unit, policy=policy) == 7
    assert len(calls) == 2
    (details,) = [d for d in seen if d.what == "transaction"]
    assert details.attempt == 1
    assert 0.0 <= details.wait <= policy.wait_max
    assert details.classification.kind is ErrorKind.DISCONNECT
    assert details.classification.sqlstate == "57P01"  # terminated by an administrator
    assert details.classification.retryable
    assert details.engine == f"postgresql+psycopg://postgres:***@127.0.0.1:{shared_pg.port}/postgres"
    assert SECRET not in repr(details)
    stats = get_stats(engine)  # the hook saw what the counters counted
    assert stats["retry.transaction"] == stats["retry.transaction.disconnect"] == 1
    engine.dispose()


def test_hook_gets_the_replay_of_a_first_statement(
    shared_pg: PostgresCluster, seen: list[RetryDetails]
) -> None:
    # A window of an hour: the checkout trusts the pooled connection, the statement finds out.
    engine = _engine(shared_pg, "hook_replay", Policy(liveness_window=3600))
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    assert shared_pg.terminate_backends(application_name="hook_replay") == 1
    with engine.connect() as conn:
        assert conn.execute(text("select 2")).scalar_one() == 2
    assert [(d.what, d.attempt, d.wait, d.classification.kind) for d in seen] == [
        ("statement", 1, 0.0, ErrorKind.DISCONNECT)
    ]
    assert get_stats(engine)["replay.statement"] == 1
    engine.dispose()


def test_hook_gets_every_connect_retry(seen: list[RetryDetails]) -> None:
    port = free_port()  # nothing listens: every attempt is refused
    policy = Policy(connect_deadline=0.3, circuit_breaker=False)
    engine = create_resilient_engine(
        f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:{port}/postgres", policy=policy
    )
    with pytest.raises(dbresilience.DatabaseUnavailable):
        engine.connect()
    connects = [d for d in seen if d.what == "connect"]
    assert len(connects) == get_stats(engine)["retry.connect"] >= 2
    assert [d.attempt for d in connects] == list(range(1, len(connects) + 1))
    for d in connects:
        assert d.classification.kind is ErrorKind.UNAVAILABLE
        assert 0.0 <= d.wait <= policy.connect_wait_max
        assert d.engine == f"postgresql+psycopg://postgres:***@127.0.0.1:{port}/postgres"
    engine.dispose()


def test_a_failing_hook_is_logged_and_removed_hooks_are_not_called(
    shared_pg: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    engine = _engine(shared_pg, "hook_broken", Policy(liveness_window=3600))
    calls: list[RetryDetails] = []

    def broken(details: RetryDetails) -> None:
        calls.append(details)
        raise RuntimeError("metrics backend down")

    def replayed_select() -> int:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        assert shared_pg.terminate_backends(application_name="hook_broken") == 1
        with engine.connect() as conn:  # replayed: the broken hook does not break it
            return int(conn.execute(text("select 3")).scalar_one())

    add_hook(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="dbresilience"):
            assert replayed_select() == 3
    finally:
        remove_hook(broken)
    assert [d.what for d in calls] == ["statement"]
    assert any("retry hook" in r.getMessage() for r in caplog.records), caplog.text
    assert replayed_select() == 3  # replayed again, the hook no longer called
    assert len(calls) == 1
    assert get_stats(engine)["replay.statement"] == 2
    engine.dispose()


def test_set_testing_attempts_caps_a_real_retry_loop(
    shared_pg: PostgresCluster, seen: list[RetryDetails]
) -> None:
    engine = _engine(shared_pg, "hook_cap")
    calls = []

    def unit(conn: Connection) -> None:
        calls.append(1)
        _kill_own_backend(conn)

    # Five attempts and a slow backoff by policy; set_testing takes the sleeps out and caps
    # the loop at two attempts.
    policy = Policy(attempts=5, wait_initial=1.0, wait_max=1.0)
    with set_testing(True, attempts=2), pytest.raises(dbresilience.DisconnectError):
        run_transaction(engine, unit, policy=policy)
    assert len(calls) == 2
    assert [(d.what, d.attempt, d.wait) for d in seen] == [("transaction", 1, 0.0)]
    # Without the cap the policy's five attempts are made (still without sleeps).
    calls.clear()
    seen.clear()
    with set_testing(True), pytest.raises(dbresilience.DisconnectError):
        run_transaction(engine, unit, policy=policy)
    assert len(calls) == 5
    assert [(d.attempt, d.wait) for d in seen] == [(n, 0.0) for n in range(1, 5)]
    engine.dispose()


def test_set_testing_attempts_caps_retries_the_deadline_alone_would_end(
    seen: list[RetryDetails],
) -> None:
    # Refused connects are "unavailable": normally retried until the deadline, whatever the
    # attempt count (connects until connect_deadline, transactions until deadline). The cap
    # ends both loops after two attempts: 2 transaction attempts of 2 connect attempts each.
    engine = create_resilient_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres",
        policy=Policy(circuit_breaker=False, connect_deadline=20.0),
    )
    t0 = time.monotonic()
    with set_testing(True, attempts=2), pytest.raises(dbresilience.DatabaseUnavailable):
        run_transaction(engine, lambda conn: None, policy=Policy(attempts=10, deadline=30.0))
    took = time.monotonic() - t0
    assert [(d.what, d.attempt) for d in seen] == [
        ("connect", 1),
        ("transaction", 1),
        ("connect", 1),
    ]
    assert get_stats(engine)["retry.transaction.unavailable"] == 1
    assert took < 10.0, took  # four refused connects, not a 20 s connect deadline
    engine.dispose()
