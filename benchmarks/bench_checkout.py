"""Checkout overhead: plain engine vs ``pool_pre_ping=True`` vs ``create_resilient_engine``.

One op is ``with engine.connect() as c: c.execute(text("select 1"))`` (checkout, one round
trip, checkin) on one thread. Engines run in interleaved rounds, the order rotating each
round, so that load from elsewhere on the machine hits all of them alike. Reported: the median
ops/s of the rounds, its ratio to the plain engine's, and the median of the per-round ratios
("paired", less sensitive to load that drifts between rounds). Usage::

    python benchmarks/bench_checkout.py [--seconds S] [--rounds R]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if importlib.util.find_spec("dbresilience") is None:  # run from a checkout, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, create_engine, text

from dbresilience import create_resilient_engine
from dbresilience.testing import PostgresCluster

SELECT_1 = text("select 1")


def ops_per_second(engine: Engine, seconds: float) -> float:
    """Run the op on ``engine`` for ``seconds``; return ops per second."""
    clock = time.perf_counter
    n = 0
    start = clock()
    deadline = start + seconds
    while True:
        with engine.connect() as conn:
            conn.execute(SELECT_1)
        n += 1
        now = clock()
        if now >= deadline:
            return n / (now - start)


def run(seconds: float, rounds: int) -> dict[str, list[float]]:
    """Start a server, benchmark the three engines; ops/s per round, by engine name."""
    cluster = PostgresCluster()
    engines: dict[str, Engine] = {}
    try:
        cluster.start()
        url = cluster.url()
        factories: dict[str, Callable[[], Engine]] = {
            "plain": lambda: create_engine(url),
            "pre_ping": lambda: create_engine(url, pool_pre_ping=True),
            "resilient": lambda: create_resilient_engine(url),
        }
        for name, make in factories.items():
            engines[name] = make()
            ops_per_second(engines[name], 0.2)  # connect, warm caches
        names = list(engines)
        results: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                results[name].append(ops_per_second(engines[name], seconds))
        return results
    finally:
        for engine in engines.values():
            engine.dispose()
        cluster.destroy()


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print a table and a JSON summary line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=1.0, help="per engine per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1:
        parser.error("--seconds must be > 0 and --rounds >= 1")

    console = Console()
    console.print(
        f"{args.rounds} rounds x {args.seconds:g} s per engine, interleaved; "
        "op = connect() + select 1 + close()",
        highlight=False,
    )
    results = run(args.seconds, args.rounds)
    medians = {name: statistics.median(values) for name, values in results.items()}
    base = medians["plain"]
    paired = {
        name: statistics.median(v / p for v, p in zip(values, results["plain"], strict=True))
        for name, values in results.items()
    }

    table = Table(title="checkout + select 1 + checkin, one thread")
    table.add_column("engine")
    table.add_column("median ops/s", justify="right")
    table.add_column("min..max ops/s", justify="right")
    table.add_column("vs plain", justify="right")
    table.add_column("vs plain, paired", justify="right")
    table.add_column("us/op", justify="right")
    for name, values in results.items():
        table.add_row(
            name,
            f"{medians[name]:,.0f}",
            f"{min(values):,.0f}..{max(values):,.0f}",
            f"{medians[name] / base:.3f}",
            f"{paired[name]:.3f}",
            f"{1e6 / medians[name]:.1f}",
        )
    console.print(table)
    summary = {
        "seconds": args.seconds,
        "rounds": args.rounds,
        "median_ops_per_s": {k: round(v, 1) for k, v in medians.items()},
        "resilient_vs_plain": round(medians["resilient"] / base, 4),
        "pre_ping_vs_plain": round(medians["pre_ping"] / base, 4),
        "paired_median_ratio": {k: round(v, 4) for k, v in paired.items() if k != "plain"},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
