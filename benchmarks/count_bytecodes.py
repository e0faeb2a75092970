"""Where a resilient op spends its extra work: Python bytecodes per op, function by function.

Timings on a shared 2-core machine drift by a few percent; bytecode counts do not. This
traces (``sys.settrace`` with ``f_trace_opcodes``) ``--ops`` async ops of the async checkout
benchmark (checkout + ``select 1`` + checkin, asyncpg) on a plain and on a resilient engine,
and prints the bytecodes per op of each, then the functions whose count differs. Code in C
(the drivers' protocol, the event loop's internals) is not counted. Usage::

    python benchmarks/count_bytecodes.py [--ops N]

The last line is a JSON summary: ``{"plain": ..., "resilient": ..., "diff": {function: n}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
from types import FrameType
from typing import Any

import _harness  # noqa: F401  (puts the checkout on sys.path when not installed)
from rich.console import Console
from rich.table import Table
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from dbresilience import create_async_resilient_engine
from dbresilience.testing import PostgresCluster

SELECT_1 = text("select 1")


class Counter:
    """Counts executed bytecodes per function while installed as the trace function."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            where = code.co_filename.split("site-packages/")[-1]
            if "/dbresilience/" in where:
                where = "dbresilience/" + where.rsplit("/dbresilience/", 1)[1]
            self.counts[f"{where}:{code.co_name}"] += 1
        return self.trace


async def ops(engine: AsyncEngine, n: int) -> None:
    for _ in range(n):
        async with engine.connect() as conn:
            await conn.execute(SELECT_1)


async def count(url: str, n: int) -> dict[str, dict[str, float]]:
    """Bytecodes per op of each engine, by function."""
    engines = {"plain": create_async_engine(url), "resilient": create_async_resilient_engine(url)}
    per_op: dict[str, dict[str, float]] = {}
    try:
        for name, engine in engines.items():
            await ops(engine, 100)  # connect, warm SQLAlchemy's caches
            counter = Counter()
            sys.settrace(counter.trace)
            try:
                await ops(engine, n)
            finally:
                sys.settrace(None)
            per_op[name] = {where: k / n for where, k in counter.counts.items()}
    finally:
        for engine in engines.values():
            await engine.dispose()
    return per_op


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--ops", type=int, default=200, help="ops traced per engine")
    args = parser.parse_args(argv)
    with PostgresCluster() as cluster:
        per_op = asyncio.run(count(cluster.url("asyncpg"), args.ops))
    plain, resilient = per_op["plain"], per_op["resilient"]
    diff = {
        where: round(resilient.get(where, 0.0) - plain.get(where, 0.0), 1)
        for where in sorted(set(plain) | set(resilient))
    }
    diff = {where: d for where, d in sorted(diff.items(), key=lambda kv: kv[1]) if abs(d) >= 0.5}
    totals = {name: round(sum(counts.values()), 1) for name, counts in per_op.items()}
    table = Table(title=f"bytecodes per op (asyncpg checkout + select 1 + checkin, {args.ops} ops)")
    table.add_column("function")
    table.add_column("resilient - plain", justify="right")
    for where, d in diff.items():
        table.add_row(where, f"{d:+.1f}")
    extra = totals["resilient"] - totals["plain"]
    table.add_row("[bold]total[/]", f"[bold]{extra:+.1f}[/] (plain {totals['plain']:,.0f})")
    Console(stderr=True).print(table)
    print(json.dumps({**totals, "diff": diff}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
