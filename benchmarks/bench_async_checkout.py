"""Async checkout overhead on asyncpg: plain vs ``pool_pre_ping=True`` vs resilient engine.

One op is ``async with engine.connect() as c: await c.execute(text("select 1"))`` (checkout,
one round trip, checkin) in one task on one event loop. Each round makes fresh engines (so no
engine keeps a luckier server backend all along), then the engines take turns in batches of
``--batch`` ops (about 10 ms), cycling through every order of the engines turn by turn (see
``_harness.orders``), until each has run ``--seconds``: load from elsewhere on the (shared,
2-core) machine drifts over seconds, so fine-grained turns hit all engines alike. Report as
in ``_harness``. Usage::

    python benchmarks/bench_async_checkout.py [--seconds S] [--rounds R] [--batch N]
"""

from __future__ import annotations

import asyncio
import sys
import time

from _harness import orders, parse_args, report
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from dbresilience import create_async_resilient_engine
from dbresilience.testing import PostgresCluster

SELECT_1 = text("select 1")


async def batch(engine: AsyncEngine, n: int) -> float:
    """Run the measured op ``n`` times on ``engine``; return the seconds it took."""
    start = time.perf_counter()
    for _ in range(n):
        async with engine.connect() as conn:
            await conn.execute(SELECT_1)
    return time.perf_counter() - start


def make_engines(url: str) -> dict[str, AsyncEngine]:
    """The engines compared, fresh."""
    return {
        "plain": create_async_engine(url),
        "pre_ping": create_async_engine(url, pool_pre_ping=True),
        "resilient": create_async_resilient_engine(url),
    }


async def measure(url: str, seconds: float, rounds: int, size: int) -> dict[str, list[float]]:
    """ops/s of each engine in each round, the engines taking turns batch by batch."""
    results: dict[str, list[float]] = {}
    turn = 0
    for _ in range(rounds):
        engines = make_engines(url)
        try:
            names = list(engines)
            cycle = orders(names)
            for engine in engines.values():
                await batch(engine, 200)  # connect, warm caches and prepared statements
            spent = dict.fromkeys(names, 0.0)
            ops = 0
            while min(spent.values()) < seconds:
                for name in cycle[turn % len(cycle)]:
                    spent[name] += await batch(engines[name], size)
                ops += size
                turn += 1
            for name in names:
                results.setdefault(name, []).append(ops / spent[name])
        finally:
            for engine in engines.values():
                await engine.dispose()
    return results


def main(argv: list[str] | None = None) -> int:
    """Start a server, benchmark the three engines on one event loop, print the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    size = 25
    if "--batch" in argv:
        i = argv.index("--batch")
        size = int(argv[i + 1])
        del argv[i : i + 2]
    args = parse_args(__doc__, argv)
    with PostgresCluster() as cluster:
        results = asyncio.run(measure(cluster.url("asyncpg"), args.seconds, args.rounds, size))
    report(
        results,
        title=f"async checkout + select 1 + checkin, asyncpg, one task, batches of {size}",
        baseline="plain",
        args=args,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
