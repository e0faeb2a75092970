"""The hang monitor's happy-path cost, in CPU time: resilient engines with and without it.

Wall-clock ratios are noisy on a shared 2-core machine; process CPU time per op (the monitor's
thread included) is what the monitor could add. One op is checkout + ``select 1`` + checkin;
the two engines alternate in batches, and the paired ratio is the median over batches of
``cpu(no monitor) / cpu(monitor)`` (1.0: free). Usage::

    python benchmarks/bench_monitor_cpu.py [--batches N] [--ops N]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

if importlib.util.find_spec("dbresilience") is None:  # run from a checkout, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import Engine, text

from dbresilience import Policy, create_resilient_engine
from dbresilience.testing import PostgresCluster

SELECT_1 = text("select 1")


def _op(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(SELECT_1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=12, help="batches per engine (12)")
    parser.add_argument("--ops", type=int, default=1500, help="ops per batch (1500)")
    args = parser.parse_args()
    pg = PostgresCluster()
    pg.start()
    try:
        engines = {
            "monitor": create_resilient_engine(pg.url()),
            "no_monitor": create_resilient_engine(pg.url(), policy=Policy(hang_threshold=0)),
        }
        for engine in engines.values():
            for _ in range(200):
                _op(engine)
        cpu: dict[str, list[float]] = {name: [] for name in engines}
        for batch in range(args.batches):
            order = list(engines.items())
            for name, engine in order if batch % 2 else order[::-1]:
                t0 = time.process_time()
                for _ in range(args.ops):
                    _op(engine)
                cpu[name].append((time.process_time() - t0) / args.ops * 1e6)
        for name, values in cpu.items():
            print(f"{name}: {statistics.median(values):.1f} us CPU per op")
        paired = [b / a for a, b in zip(cpu["monitor"], cpu["no_monitor"], strict=True)]
        print(f"paired ratio (1.0 = free): {statistics.median(paired):.4f}")
        for engine in engines.values():
            engine.dispose()
    finally:
        pg.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
