"""Behind a real PgBouncer (transaction pooling): exactly once under the pooler's own faults.

Needs Debian's ``pgbouncer`` package; ``.ci/run`` installs it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from _support import check_exactly_once, ledger_workload
from sqlalchemy import Engine, text

import dbresilience
from dbresilience import create_resilient_engine, get_stats
from dbresilience.testing import PostgresCluster
from dbresilience.testing._pgbouncer import PgBouncer, find_pgbouncer

pytestmark = pytest.mark.skipif(
    find_pgbouncer() is None, reason="needs Debian's pgbouncer package (.ci/run installs it)"
)

THREADS = 8
DURATION = 6.0


@pytest.fixture
def bouncer(pg: PostgresCluster) -> Iterator[PgBouncer]:
    # No unique constraint on purpose: a transaction applied twice must show up as a duplicate.
    pg.execute("create table ledger (worker int, seq int)")
    with PgBouncer(pg, pool_mode="transaction") as bouncer:
        yield bouncer


def _engine(bouncer: PgBouncer) -> Engine:
    # Transaction pooling hands each transaction any server connection: no server-side
    # prepared statements (psycopg prepares a query after 5 runs by default).
    return create_resilient_engine(
        bouncer.url(), pool_size=THREADS, connect_args={"prepare_threshold": None}
    )


def _exactly_once_under(
    fault: Callable[[threading.Event], None], pg: PostgresCluster, bouncer: PgBouncer, label: str
) -> dict[str, int]:
    """Run the ledger workload through ``bouncer`` while ``fault`` runs; check it; its stats."""
    engine = _engine(bouncer)
    try:
        ledger = ledger_workload(engine, fault, threads=THREADS, duration=DURATION)
        check_exactly_once(pg, ledger, label=label, minimum=100)
        stats = get_stats(engine)
        print(stats)
        return stats
    finally:
        engine.dispose()


def test_postgres_restart_behind_pgbouncer_exactly_once(
    pg: PostgresCluster, bouncer: PgBouncer
) -> None:
    def restart(stop: threading.Event) -> None:
        stop.wait(1.5)
        pg.restart(down_for=1.0)

    stats = _exactly_once_under(restart, pg, bouncer, "postgres restart behind pgbouncer")
    # PgBouncer keeps our connections through the restart: its errors (server conn crashed,
    # cannot connect to server) are what the retries had to handle.
    assert stats["retry.transaction"] > 0


def test_pgbouncer_restart_exactly_once(pg: PostgresCluster, bouncer: PgBouncer) -> None:
    def restart(stop: threading.Event) -> None:
        stop.wait(1.5)
        bouncer.restart(down_for=1.0)  # every client connection dropped, then refused for 1 s

    stats = _exactly_once_under(restart, pg, bouncer, "pgbouncer restart")
    # The restart really hit: connects were refused, and transactions in flight were cut
    # (absorbed by first-statement replay or by retrying the transaction).
    assert stats["retry.connect"] > 0
    assert stats.get("replay.statement", 0) + stats.get("retry.transaction", 0) > 0


def test_pgbouncer_kill_and_resume_exactly_once(pg: PostgresCluster, bouncer: PgBouncer) -> None:
    def kill(stop: threading.Event) -> None:
        while not stop.wait(0.5):
            # Drops every client and server connection of the database at once.
            bouncer.admin("KILL postgres")
            bouncer.admin("RESUME postgres")

    stats = _exactly_once_under(kill, pg, bouncer, "pgbouncer KILL every 0.5 s")
    assert stats["retry.transaction"] > 0


def test_idle_connections_survive_a_postgres_restart_behind_pgbouncer(
    pg: PostgresCluster, bouncer: PgBouncer
) -> None:
    engine = _engine(bouncer)
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    pg.restart(down_for=0.5)
    started = time.monotonic()
    with engine.begin() as conn:
        assert conn.execute(text("select 2")).scalar_one() == 2
    print(f"first statement after the restart: {time.monotonic() - started:.3f}s")
    engine.dispose()



def test_hang_monitor_behind_pgbouncer_leaves_a_slow_query_alone(
    pg: PostgresCluster, bouncer: PgBouncer
) -> None:
    engine = _engine(bouncer)
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    t0 = time.monotonic()
    with engine.connect() as conn:  # the backend pid the client knows is PgBouncer's
        conn.execute(text("select pg_sleep(3)"))
    took = time.monotonic() - t0
    monitor = dbresilience._engine_hooks.resilience_of(engine).monitor
    stats = get_stats(engine)
    print(f"\nbehind PgBouncer: slow query took {took:.2f}s, {stats}")
    assert monitor.behind_pooler  # noticed at connect: the pids differ
    assert stats.get("hang.slow", 0) > 0  # looked into with the host-level probe only
    assert not any(k.startswith("hang.aborted") for k in stats)
    engine.dispose()
