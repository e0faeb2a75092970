"""Shared benchmark harness: interleaved rounds and a ratio report against a baseline.

Engines run in interleaved rounds, so that load from elsewhere on the (noisy, 2-core) machine
hits all of them alike, cycling through every order of the engines (:func:`orders`): with a
plain rotation each engine mostly follows the same other one, and what that one leaves in the
CPU caches (``pool_pre_ping``'s extra round trip and code) then weighs on it alone.
Reported: the median ops/s of the rounds, its ratio to the baseline's, and the median of the
per-round ratios ("paired", less sensitive to load that drifts between rounds).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if importlib.util.find_spec("dbresilience") is None:  # run from a checkout, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from rich.table import Table


def timed_batch(op: Callable[[], object], n: int) -> float:
    """Call ``op`` ``n`` times; return the seconds it took."""
    clock = time.perf_counter
    start = clock()
    for _ in range(n):
        op()
    return clock() - start


def orders(names: list[str]) -> list[list[str]]:
    """Every order of ``names``, to cycle through turn by turn: each engine runs after each
    other one equally often (a balanced design, unlike a rotation)."""
    return [list(order) for order in itertools.permutations(names)]


def interleave(
    ops: dict[str, Callable[[], object]], seconds: float, rounds: int, batch: int = 25
) -> dict[str, list[float]]:
    """ops/s of each ``ops[name]`` in each round.

    Within a round the engines take turns in batches of ``batch`` ops (about 10 ms), cycling
    through :func:`orders`, until each has run ``seconds``: load from elsewhere drifts over
    seconds, so fine-grained turns hit all engines alike.
    """
    for op in ops.values():
        timed_batch(op, 200)  # connect, warm caches
    names = list(ops)
    cycle = orders(names)
    results: dict[str, list[float]] = {name: [] for name in names}
    turn = 0
    for _ in range(rounds):
        spent = dict.fromkeys(names, 0.0)
        done = 0
        while min(spent.values()) < seconds:
            for name in cycle[turn % len(cycle)]:
                spent[name] += timed_batch(ops[name], batch)
            done += batch
            turn += 1
        for name in names:
            results[name].append(done / spent[name])
    return results


def parse_args(doc: str | None, argv: list[str] | None) -> argparse.Namespace:
    """``--seconds`` (per engine per round, default 1.0) and ``--rounds`` (default 7)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    parser.add_argument("--seconds", type=float, default=1.0, help="per engine per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1:
        parser.error("--seconds must be > 0 and --rounds >= 1")
    return args


def report(
    results: dict[str, list[float]], *, title: str, baseline: str, args: argparse.Namespace
) -> dict[str, object]:
    """Print a table and a one-line JSON summary; return the summary."""
    medians = {name: statistics.median(values) for name, values in results.items()}
    base = medians[baseline]
    paired = {
        name: statistics.median(v / p for v, p in zip(values, results[baseline], strict=True))
        for name, values in results.items()
    }
    table = Table(title=title)
    for column in ("engine", "median ops/s", "min..max ops/s", "vs " + baseline, "paired", "us/op"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for name, values in results.items():
        table.add_row(
            name,
            f"{medians[name]:,.0f}",
            f"{min(values):,.0f}..{max(values):,.0f}",
            f"{medians[name] / base:.3f}",
            f"{paired[name]:.3f}",
            f"{1e6 / medians[name]:.1f}",
        )
    Console().print(table)
    summary: dict[str, object] = {
        "title": title,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "median_ops_per_s": {k: round(v, 1) for k, v in medians.items()},
        "ratio_of_medians": {k: round(v / base, 4) for k, v in medians.items() if k != baseline},
        "paired_median_ratio": {k: round(v, 4) for k, v in paired.items() if k != baseline},
    }
    print(json.dumps(summary))
    return summary


def compare_engines(
    argv: list[str] | None,
    *,
    doc: str | None,
    title: str,
    factories: dict[str, Callable[[str], Any]],
    op: Callable[[Any], object],
    setup_sql: str | None = None,
) -> int:
    """Start a server, build each engine from its URL, time ``op(engine)`` interleaved, report.

    The first factory is the baseline the others are compared with.
    """
    from dbresilience.testing import PostgresCluster

    args = parse_args(doc, argv)
    with PostgresCluster() as cluster:
        if setup_sql:
            cluster.execute(setup_sql)
        engines = {name: make(cluster.url()) for name, make in factories.items()}
        try:
            results = interleave(
                {name: (lambda e=e: op(e)) for name, e in engines.items()},
                args.seconds,
                args.rounds,
            )
        finally:
            for engine in engines.values():
                engine.dispose()
    report(results, title=title, baseline=next(iter(factories)), args=args)
    return 0
