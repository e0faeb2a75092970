"""Checkout overhead: plain engine vs ``pool_pre_ping=True`` vs ``create_resilient_engine``
(with and without the hang monitor).

One op is ``with engine.connect() as c: c.execute(text("select 1"))`` (checkout, one round
trip, checkin) on one thread, engines interleaved (see ``_harness``). Usage::

    python benchmarks/bench_checkout.py [--seconds S] [--rounds R]
"""

from __future__ import annotations

from _harness import compare_engines
from sqlalchemy import Engine, create_engine, text

from dbresilience import Policy, create_resilient_engine

SELECT_1 = text("select 1")


def checkout_select_1(engine: Engine) -> None:
    """The measured op."""
    with engine.connect() as conn:
        conn.execute(SELECT_1)


def main(argv: list[str] | None = None) -> int:
    """Benchmark the three engines on a fresh server and print the report."""
    return compare_engines(
        argv,
        doc=__doc__,
        title="checkout + select 1 + checkin, psycopg, one thread",
        factories={
            "plain": create_engine,
            "pre_ping": lambda url: create_engine(url, pool_pre_ping=True),
            "resilient": create_resilient_engine,
            # The hang monitor off: its share of the happy path (the call's start time in the
            # watchdog's entry, run_transaction's deadline looked up) is resilient / this.
            "no_monitor": lambda url: create_resilient_engine(
                url, policy=Policy(hang_threshold=0)
            ),
        },
        op=checkout_select_1,
    )


if __name__ == "__main__":
    raise SystemExit(main())
