"""Issue #2's acceptance run: 8 threads of short transactions through a 1 s server restart.

App code is unchanged (``with engine.begin()``); only the engine factory differs.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

from sqlalchemy import Engine, create_engine, text

from dbresilience import create_resilient_engine
from dbresilience.testing import PostgresCluster

THREADS = 8


def _run(engine: Engine, pg: PostgresCluster, *, before: float, after: float) -> Counter[str]:
    """Run the workload, restart the server (down 1 s) ``before`` seconds in; count errors."""
    stop = threading.Event()
    errors: Counter[str] = Counter()
    done = Counter[str]()
    lock = threading.Lock()

    def worker(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                with engine.begin() as conn:
                    conn.execute(
                        text("insert into ledger (worker, seq) values (:w, :s)"), {"w": n, "s": i}
                    )
                    conn.execute(text("select count(*) from ledger")).scalar_one()
                with lock:
                    done["ok"] += 1
            except Exception as e:
                with lock:
                    errors[type(e).__name__] += 1
                time.sleep(0.001)  # an app would report the error; don't spin at 100 % CPU

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(THREADS)]
    for t in threads:
        t.start()
    time.sleep(before)
    pg.restart(down_for=1.0)
    time.sleep(after)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a worker is stuck"
    assert done["ok"] > 0
    return errors


def _fresh_ledger(pg: PostgresCluster) -> None:
    pg.execute("drop table if exists ledger")
    pg.execute("create table ledger (worker int, seq int, primary key (worker, seq))")


def _measure(pg: PostgresCluster, factory: Callable[[str], Engine]) -> Counter[str]:
    _fresh_ledger(pg)
    engine = factory(pg.url())
    try:
        return _run(engine, pg, before=1.0, after=2.0)
    finally:
        engine.dispose()


def test_restart_surfaces_at_most_one_error_per_inflight_transaction(pg: PostgresCluster) -> None:
    resilient = _measure(pg, lambda url: create_resilient_engine(url, pool_size=THREADS))
    plain = _measure(pg, lambda url: create_engine(url, pool_size=THREADS))
    print(f"\nresilient errors: {dict(resilient)}\nplain errors: {dict(plain)}")
    # One restart; at most one error for each transaction in flight at that moment.
    assert sum(resilient.values()) <= THREADS
    # The plain engine fails every attempt while the server is down.
    assert sum(plain.values()) > 10 * THREADS
