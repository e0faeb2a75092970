"""Checkout overhead: plain engine vs ``pool_pre_ping=True`` vs ``create_resilient_engine``.

One op is ``with engine.connect() as c: c.execute(text("select 1"))`` (checkout, one round
trip, checkin) on one thread, engines interleaved (see ``_harness``). Usage::

    python benchmarks/bench_checkout.py [--seconds S] [--rounds R]
"""

from __future__ import annotations

from _harness import interleave, ops_per_second, parse_args, report
from sqlalchemy import Engine, create_engine, text

from dbresilience import create_resilient_engine
from dbresilience.testing import PostgresCluster

SELECT_1 = text("select 1")


def checkout_select_1(engine: Engine) -> None:
    """The measured op."""
    with engine.connect() as conn:
        conn.execute(SELECT_1)


def main(argv: list[str] | None = None) -> int:
    """Start a server, benchmark the three engines, print the report."""
    args = parse_args(__doc__, argv)
    with PostgresCluster() as cluster:
        url = cluster.url()
        engines = {
            "plain": create_engine(url),
            "pre_ping": create_engine(url, pool_pre_ping=True),
            "resilient": create_resilient_engine(url),
        }
        try:
            results = interleave(
                {
                    name: (lambda s, e=e: ops_per_second(lambda: checkout_select_1(e), s))
                    for name, e in engines.items()
                },
                args.seconds,
                args.rounds,
            )
        finally:
            for engine in engines.values():
                engine.dispose()
    report(
        results,
        title="checkout + select 1 + checkin, psycopg, one thread",
        baseline="plain",
        args=args,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
