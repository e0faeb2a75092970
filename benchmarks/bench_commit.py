"""Cost of commit-outcome tracking on write transactions.

One op is ``with engine.begin() as c: c.execute(insert)`` (checkout, BEGIN, INSERT, COMMIT,
checkin) on one thread. Compared, interleaved (see ``_harness``): plain ``create_engine``, the
resilient engine with ``verify_commits=False`` and with the default ``verify_commits=True``
(one extra round trip per COMMIT: ``pg_current_xact_id_if_assigned()``). Usage::

    python benchmarks/bench_commit.py [--seconds S] [--rounds R]
"""

from __future__ import annotations

from _harness import interleave, ops_per_second, parse_args, report
from sqlalchemy import Engine, create_engine, text

from dbresilience import Policy, create_resilient_engine
from dbresilience.testing import PostgresCluster

INSERT = text("insert into bench (v) values (1)")


def write_transaction(engine: Engine) -> None:
    """The measured op."""
    with engine.begin() as conn:
        conn.execute(INSERT)


def main(argv: list[str] | None = None) -> int:
    """Start a server, benchmark the three engines, print the report."""
    args = parse_args(__doc__, argv)
    with PostgresCluster() as cluster:
        cluster.execute("create table bench (id bigserial primary key, v int)")
        url = cluster.url()
        engines = {
            "plain": create_engine(url),
            "resilient_no_verify": create_resilient_engine(
                url, policy=Policy(verify_commits=False)
            ),
            "resilient": create_resilient_engine(url),
        }
        try:
            results = interleave(
                {
                    name: (lambda s, e=e: ops_per_second(lambda: write_transaction(e), s))
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
        title="write transaction (insert + commit), psycopg, one thread",
        baseline="plain",
        args=args,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
