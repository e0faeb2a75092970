"""Soak: exactly-once writes through random faults, optionally on a CPU-loaded machine.

Worker threads run ``run_transaction(insert-then-count)`` through a chaos proxy into a ledger
table while a fault thread picks, at random intervals, one of: a restart, an outage of 2-5 s,
``pg_terminate_backend`` of every client, an RST storm (every proxied link reset, repeatedly,
for 2 s). At the end the table is compared with what was acknowledged::

    python benchmarks/soak_faults.py --duration 300 --load 2

prints acknowledged / errors (by class) / missing / duplicated / unacknowledged, the engine's
commit-check verdicts and the exit status 1 when anything was lost, duplicated or surfaced.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import multiprocessing
import random
import sys
import threading
import time
from pathlib import Path

if importlib.util.find_spec("dbresilience") is None:  # run from a checkout, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import Connection, text

from dbresilience import create_resilient_engine, get_stats, run_transaction
from dbresilience.testing import ChaosProxy, PostgresCluster


def _burn(stop_at: float) -> None:
    x = 0
    while time.monotonic() < stop_at:
        x = (x * 31 + 7) % 1_000_003


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds (default 300)")
    parser.add_argument("--threads", type=int, default=8, help="writer threads (default 8)")
    parser.add_argument("--load", type=int, default=0, help="CPU-burning processes (default 0)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    pg = PostgresCluster()
    pg.start()
    burners = [
        multiprocessing.Process(target=_burn, args=(time.monotonic() + args.duration + 30,))
        for _ in range(args.load)
    ]
    for b in burners:
        b.start()
    faults: collections.Counter[str] = collections.Counter()
    try:
        pg.execute("create table ledger (worker int, seq int)")
        with ChaosProxy(pg.host, pg.port) as proxy:
            engine = create_resilient_engine(pg.url(port=proxy.port), pool_size=args.threads)
            acknowledged: set[tuple[int, int]] = set()
            errors: collections.Counter[str] = collections.Counter()
            lock = threading.Lock()
            stop = threading.Event()

            def unit(conn: Connection, worker: int, seq: int) -> int:
                conn.execute(
                    text("insert into ledger values (:w, :s)"), {"w": worker, "s": seq}
                )
                return int(conn.execute(text("select count(*) from ledger")).scalar_one())

            def writer(n: int) -> None:
                seq = 0
                while not stop.is_set():
                    seq += 1
                    try:
                        run_transaction(engine, lambda c, s=seq: unit(c, n, s))
                    except Exception as e:
                        with lock:
                            errors[type(e).__name__] += 1
                        continue
                    with lock:
                        acknowledged.add((n, seq))

            def faulter() -> None:
                while not stop.wait(rng.uniform(2.0, 8.0)):
                    kind = rng.choice(["restart", "outage", "kill", "rst-storm"])
                    faults[kind] += 1
                    if kind == "restart":
                        pg.restart()
                    elif kind == "outage":
                        pg.restart(down_for=rng.uniform(2.0, 5.0))
                    elif kind == "kill":
                        pg.terminate_backends()
                    else:
                        until = time.monotonic() + 2.0
                        while time.monotonic() < until:
                            proxy.reset_all()
                            time.sleep(0.05)

            threads = [threading.Thread(target=writer, args=(n,)) for n in range(args.threads)]
            threads.append(threading.Thread(target=faulter))
            for t in threads:
                t.start()
            time.sleep(args.duration)
            stop.set()
            for t in threads:
                t.join(120)
            stats = get_stats(engine)
            engine.dispose()
        if not pg.is_running():
            pg.start()
        rows = [(int(str(w)), int(str(s))) for w, s in pg.execute("select worker, seq from ledger")]
    finally:
        for b in burners:
            b.terminate()
        pg.destroy()
    present = set(rows)
    duplicated = len(rows) - len(present)
    missing = acknowledged - present
    unacknowledged = present - acknowledged
    counters = sorted(stats.counters.items())
    commits = {k: v for k, v in counters if k.startswith(("commit.", "commit-"))}
    print(
        f"duration={args.duration:.0f}s threads={args.threads} load={args.load} "
        f"faults={dict(faults)}\n"
        f"acknowledged={len(acknowledged)} errors={dict(errors)} missing={len(missing)} "
        f"duplicated={duplicated} unacknowledged={len(unacknowledged)}\n"
        f"commit checks: {commits}"
    )
    return 1 if errors or missing or duplicated else 0


if __name__ == "__main__":
    sys.exit(main())
