"""Cost of commit-outcome tracking on write transactions.

One op is ``with engine.begin() as c: c.execute(insert)`` (checkout, BEGIN, INSERT, COMMIT,
checkin) on one thread. Compared, interleaved (see ``_harness``): plain ``create_engine``, the
resilient engine with ``verify_commits=False`` and with the default ``verify_commits=True``
(one extra round trip per COMMIT: ``pg_current_xact_id_if_assigned()``). Usage::

    python benchmarks/bench_commit.py [--seconds S] [--rounds R]
"""

from __future__ import annotations

from _harness import compare_engines
from sqlalchemy import Engine, create_engine, text

from dbresilience import Policy, create_resilient_engine

INSERT = text("insert into bench (v) values (1)")


def write_transaction(engine: Engine) -> None:
    """The measured op."""
    with engine.begin() as conn:
        conn.execute(INSERT)


def main(argv: list[str] | None = None) -> int:
    """Benchmark the three engines on a fresh server and print the report."""
    return compare_engines(
        argv,
        doc=__doc__,
        title="write transaction (insert + commit), psycopg, one thread",
        factories={
            "plain": create_engine,
            "resilient_no_verify": lambda url: create_resilient_engine(
                url, policy=Policy(verify_commits=False)
            ),
            "resilient": create_resilient_engine,
        },
        op=write_transaction,
        setup_sql="create table bench (id bigserial primary key, v int)",
    )


if __name__ == "__main__":
    raise SystemExit(main())
