"""Ambiguous commits, made deterministic: the chaos proxy cuts the connection right after the
COMMIT bytes went through, so the server decides and the client never hears the answer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

import dbresilience
from dbresilience import Policy, create_resilient_engine, get_stats
from dbresilience.testing import ChaosProxy, PostgresCluster


@pytest.fixture
def proxy(pg: PostgresCluster) -> Iterator[ChaosProxy]:
    with ChaosProxy(pg.host, pg.port) as p:
        yield p


@pytest.fixture
def via_proxy(pg: PostgresCluster, proxy: ChaosProxy) -> Iterator[Engine]:
    pg.execute("create table ledger (id int primary key)")
    pg.execute(
        "create table child (id int primary key, parent int references ledger(id) "
        "deferrable initially deferred)"
    )
    engine = create_resilient_engine(pg.url(port=proxy.port))
    yield engine
    engine.dispose()


def _rows(pg: PostgresCluster, table: str) -> list[int]:
    return [int(str(r[0])) for r in pg.execute(f"select id from {table} order by id")]


def test_commit_that_happened_is_reported_as_success(
    pg: PostgresCluster, proxy: ChaosProxy, via_proxy: Engine
) -> None:
    with via_proxy.begin() as conn:
        conn.execute(text("insert into ledger values (1)"))
        proxy.close_after(match=b"COMMIT")
    # The block exited without error: the commit was verified on a new connection.
    assert _rows(pg, "ledger") == [1]
    stats = get_stats(via_proxy)
    assert stats["commit.committed"] == 1
    # And the engine keeps working (the dead connection was replaced).
    with via_proxy.begin() as conn:
        conn.execute(text("insert into ledger values (2)"))
    assert _rows(pg, "ledger") == [1, 2]


def test_commit_that_failed_on_the_server_is_reported_as_retryable(
    pg: PostgresCluster, proxy: ChaosProxy, via_proxy: Engine
) -> None:
    # The deferred foreign key fails at COMMIT: the server receives COMMIT and aborts.
    with pytest.raises(dbresilience.DisconnectError) as info, via_proxy.begin() as conn:
        conn.execute(text("insert into child values (1, 999)"))
        proxy.close_after(match=b"COMMIT")
    assert info.value.retryable
    assert "verified not committed" in info.value.classification.reason
    assert not isinstance(info.value, dbresilience.CommitOutcomeUnknown)
    assert _rows(pg, "child") == []
    assert get_stats(via_proxy)["commit.aborted"] == 1


def test_read_only_transaction_needs_no_verification(
    pg: PostgresCluster, proxy: ChaosProxy, via_proxy: Engine
) -> None:
    with via_proxy.begin() as conn:
        assert conn.execute(text("select count(*) from ledger")).scalar_one() == 0
        proxy.close_after(match=b"COMMIT")
    assert get_stats(via_proxy)["commit.read-only"] == 1


def test_unanswerable_outcome_is_commit_outcome_unknown(
    pg: PostgresCluster, proxy: ChaosProxy, via_proxy: Engine
) -> None:
    """After the cut, the proxy points at a different server (as after a failover to a node
    that never saw the transaction): its answer must not be trusted."""
    with PostgresCluster() as other:
        with pytest.raises(dbresilience.CommitOutcomeUnknown) as info, via_proxy.begin() as conn:
            conn.execute(text("insert into ledger values (7)"))
            proxy.close_after(match=b"COMMIT")
            proxy.set_upstream(other.host, other.port)
        assert isinstance(info.value, __import__("sqlalchemy").exc.OperationalError)
        assert not info.value.retryable
    assert get_stats(via_proxy)["commit.unknown"] == 1


def test_outcome_unknown_when_server_stays_down(pg: PostgresCluster, proxy: ChaosProxy) -> None:
    pg.execute("create table ledger (id int primary key)")
    engine = create_resilient_engine(
        pg.url(port=proxy.port), policy=Policy(commit_check_timeout=1.0, connect_deadline=0.5)
    )
    with pytest.raises(dbresilience.CommitOutcomeUnknown), engine.begin() as conn:
        conn.execute(text("insert into ledger values (1)"))
        proxy.close_after(match=b"COMMIT")
        proxy.refuse()
    engine.dispose()


def test_verification_can_be_turned_off(pg: PostgresCluster, proxy: ChaosProxy) -> None:
    pg.execute("create table ledger (id int primary key)")
    engine = create_resilient_engine(pg.url(port=proxy.port), policy=Policy(verify_commits=False))
    with pytest.raises(dbresilience.CommitOutcomeUnknown), engine.begin() as conn:
        conn.execute(text("insert into ledger values (1)"))
        proxy.close_after(match=b"COMMIT")
    assert "commit.committed" not in get_stats(engine)
    engine.dispose()
