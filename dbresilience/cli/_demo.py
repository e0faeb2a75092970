"""``dbresilience demo``: one workload and one fault script, a resilient and a plain engine.

Worker threads run short ``with engine.begin()`` transactions (insert a row with a unique id
into a ledger table, then count the rows) while the main thread kills every backend, restarts
the server and kills backends again. Afterwards the ledger is compared with what the workers
saw acknowledged.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, create_engine, text

from dbresilience import create_resilient_engine, get_stats
from dbresilience.testing import PostgresCluster

__all__ = ["DemoResult", "EngineRun", "FaultEvent", "print_result", "run_demo"]

Action = Literal["kill", "restart"]

# (fraction of the duration, action). Faults never overlap: one that is due while the
# previous one still runs starts _FAULT_SPACING seconds after it ended.
FAULT_SCRIPT: tuple[tuple[float, Action], ...] = (
    (0.20, "kill"),
    (0.35, "kill"),
    (0.50, "restart"),
    (0.80, "kill"),
    (0.80, "kill"),
    (0.80, "kill"),
)
RESTART_DOWN_FOR = 1.0
_FAULT_SPACING = 0.2
_SETTLE = 1.0  # workload keeps running this long after the last fault
_THINK = 0.01  # pause between transactions of one worker
_ERROR_PAUSE = 0.05  # what an application would wait after a failed transaction
_JOIN_GRACE = 20.0  # > the resilient engine's connect deadline (10 s)
_WORKER_ID_STRIDE = 10_000_000
_RECOVERY_KEYS = ("replay.statement", "dead.replaced", "retry.connect")
_LOGGERS = ("dbresilience", "sqlalchemy")


@dataclass(frozen=True, slots=True)
class FaultEvent:
    """One injected fault; times in seconds since the workload started.

    :ivar took: how long the fault lasted (a restart: until the server accepted connections).
    :ivar backends_killed: sessions terminated by a ``kill`` (0 for a restart).
    """

    at: float
    action: Action
    took: float
    backends_killed: int


@dataclass(frozen=True, slots=True)
class EngineRun:
    """What one engine did under the fault script.

    :ivar errors: exceptions that reached the application, by class name.
    :ivar recoveries: the resilient engine's silent recoveries (``get_stats`` counters
        ``replay.statement``, ``dead.replaced``, ``retry.connect``); empty for the plain engine.
    :ivar missing_acknowledged: rows whose transaction exited without an exception but which
        are not in the table. Must be 0.
    :ivar outcome_unknown: rows in the table whose transaction raised (the error surfaced at
        or after COMMIT): the application could not know they committed.
    :ivar errors_by_fault: errors surfaced from each fault until the next one (the first also
        counts any error before it).
    :ivar log_lines: records of the ``dbresilience`` / ``sqlalchemy`` loggers held back.
    """

    engine: Literal["resilient", "plain"]
    attempted: int
    succeeded: int
    errors: dict[str, int]
    recoveries: dict[str, int]
    rows_in_table: int
    missing_acknowledged: int
    outcome_unknown: int
    longest_gap: float
    hung_workers: int
    faults: tuple[FaultEvent, ...]
    errors_by_fault: tuple[int, ...]
    log_lines: dict[str, int]

    @property
    def errors_surfaced(self) -> int:
        """Total exceptions the application saw."""
        return sum(self.errors.values())

    @property
    def ok(self) -> bool:
        """No acknowledged write lost and every worker finished."""
        return self.missing_acknowledged == 0 and self.hung_workers == 0


@dataclass(frozen=True, slots=True)
class DemoResult:
    """Both runs of one demo; ``plain`` is ``None`` with ``compare=False``."""

    threads: int
    duration: float
    resilient: EngineRun
    plain: EngineRun | None

    @property
    def ok(self) -> bool:
        """The demo ran as intended (see :attr:`EngineRun.ok`); errors surfaced are fine."""
        return (
            self.resilient.ok
            and self.resilient.succeeded > 0
            and (self.plain is None or self.plain.ok)
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary, with ``errors_surfaced`` added to each run."""
        out = asdict(self)
        for name in ("resilient", "plain"):
            run: EngineRun | None = getattr(self, name)
            if run is not None:
                out[name]["errors_surfaced"] = run.errors_surfaced
        return out


@dataclass(slots=True)
class _Tally:
    attempted: int = 0
    acked: list[int] = field(default_factory=list)
    ack_times: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    error_times: list[float] = field(default_factory=list)


class _CountingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.name.partition(".")[0]] += 1


@contextlib.contextmanager
def _logs_counted() -> Iterator[_CountingHandler]:
    """Route the library loggers to a counter, so retries do not flood the demo output."""
    handler = _CountingHandler()
    saved = []
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate, logger.level))
        logger.handlers = [handler]
        logger.propagate = False
        if name == "dbresilience":
            logger.setLevel(logging.INFO)  # routine retries (connect, statement replay) are INFO
    try:
        yield handler
    finally:
        for logger, handlers, propagate, level in saved:
            logger.handlers = handlers
            logger.propagate = propagate
            logger.setLevel(level)


def _work(engine: Engine, table: str, worker: int, stop: threading.Event, tally: _Tally) -> None:
    insert = text(f"insert into {table} (id, worker) values (:id, :worker)")
    count = text(f"select count(*) from {table}")
    for seq in itertools.count():
        if stop.is_set():
            return
        row_id = worker * _WORKER_ID_STRIDE + seq
        tally.attempted += 1
        try:
            with engine.begin() as conn:
                conn.execute(insert, {"id": row_id, "worker": worker})
                conn.execute(count).scalar_one()
        except Exception as exc:
            tally.errors[type(exc).__name__] += 1
            tally.error_times.append(time.monotonic())
            stop.wait(_ERROR_PAUSE)
        else:
            tally.acked.append(row_id)
            tally.ack_times.append(time.monotonic())
            stop.wait(_THINK)


def _inject(cluster: PostgresCluster, duration: float, t0: float) -> list[FaultEvent]:
    events: list[FaultEvent] = []
    ready = t0
    for fraction, action in FAULT_SCRIPT:
        start = max(t0 + duration * fraction, ready)
        time.sleep(max(0.0, start - time.monotonic()))
        begun = time.monotonic()
        killed = 0
        if action == "kill":
            killed = cluster.terminate_backends()
        else:
            cluster.restart(down_for=RESTART_DOWN_FOR)
        took = time.monotonic() - begun
        events.append(FaultEvent(round(begun - t0, 3), action, round(took, 3), killed))
        ready = begun + took + _FAULT_SPACING
    return events


def _errors_by_fault(times: list[float], faults: list[FaultEvent], t0: float) -> tuple[int, ...]:
    starts = [t0 + f.at for f in faults]
    counts = [0] * len(faults)
    for t in times:
        index = bisect.bisect_right(starts, t) - 1
        counts[max(index, 0)] += 1
    return tuple(counts)


def _longest_gap(times: list[float], start: float, end: float) -> float:
    points = [start, *sorted(times), end]
    return max(b - a for a, b in itertools.pairwise(points))


def _run_engine(
    cluster: PostgresCluster,
    kind: Literal["resilient", "plain"],
    threads: int,
    duration: float,
) -> EngineRun:
    table = f"ledger_{kind}"
    cluster.execute(f"create table {table} (id bigint primary key, worker int not null)")
    pool: dict[str, Any] = {"pool_size": threads, "max_overflow": 0, "pool_timeout": 15}
    if kind == "resilient":
        engine = create_resilient_engine(cluster.url(), **pool)
    else:
        engine = create_engine(cluster.url(), **pool)
    stop = threading.Event()
    tallies = [_Tally() for _ in range(threads)]
    workers = [
        threading.Thread(
            target=_work,
            args=(engine, table, i + 1, stop, tallies[i]),
            name=f"dbresilience-demo-{kind}-{i + 1}",
            daemon=True,
        )
        for i in range(threads)
    ]
    with _logs_counted() as logs:
        try:
            t0 = time.monotonic()
            for w in workers:
                w.start()
            faults = _inject(cluster, duration, t0)
            end = max(t0 + duration, t0 + faults[-1].at + faults[-1].took + _SETTLE)
            time.sleep(max(0.0, end - time.monotonic()))
        finally:
            stop.set()
            join_by = time.monotonic() + _JOIN_GRACE
            for w in workers:
                w.join(max(0.0, join_by - time.monotonic()))
            engine.dispose()
    present = {int(str(row[0])) for row in cluster.execute(f"select id from {table}")}
    acked = {row_id for t in tallies for row_id in t.acked}
    errors: Counter[str] = Counter()
    for t in tallies:
        errors.update(t.errors)
    recoveries: dict[str, int] = {}
    if kind == "resilient":
        stats = get_stats(engine)
        recoveries = {key: stats.get(key, 0) for key in _RECOVERY_KEYS}
    return EngineRun(
        engine=kind,
        attempted=sum(t.attempted for t in tallies),
        succeeded=len(acked),
        errors=dict(errors.most_common()),
        recoveries=recoveries,
        rows_in_table=len(present),
        missing_acknowledged=len(acked - present),
        outcome_unknown=len(present - acked),
        longest_gap=round(_longest_gap([x for t in tallies for x in t.ack_times], t0, end), 3),
        hung_workers=sum(w.is_alive() for w in workers),
        faults=tuple(faults),
        errors_by_fault=_errors_by_fault([x for t in tallies for x in t.error_times], faults, t0),
        log_lines=dict(logs.counts),
    )


def run_demo(
    *,
    threads: int = 8,
    duration: float = 12.0,
    compare: bool = True,
    progress: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the workload and fault script on a throwaway server; the server is always removed.

    :param threads: worker threads per engine.
    :param duration: seconds of workload per engine (stretched if the faults take longer).
    :param compare: also run a plain ``create_engine()`` through the same faults.
    :param progress: called with a one-line message before each phase.
    """
    say = progress or (lambda _line: None)
    say("starting a throwaway PostgreSQL server...")
    cluster = PostgresCluster()
    try:
        cluster.start()
        say(f"resilient engine: {threads} threads for {duration:g} s, faults injected...")
        resilient = _run_engine(cluster, "resilient", threads, duration)
        plain = None
        if compare:
            say(f"plain create_engine(): {threads} threads for {duration:g} s, same faults...")
            plain = _run_engine(cluster, "plain", threads, duration)
    finally:
        cluster.destroy()
    return DemoResult(threads, duration, resilient, plain)


def _fmt_counts(counts: dict[str, int]) -> str:
    return "\n".join(f"{n} {name}" for name, n in counts.items()) or "-"


def _zero_good(n: int) -> str:
    return f"[green]{n}[/]" if n == 0 else f"[bold red]{n}[/]"


def print_result(result: DemoResult, console: Console) -> None:
    """Render ``result`` as tables, then one JSON line ``{"dbresilience_demo": ...}``."""
    runs = [r for r in (result.resilient, result.plain) if r is not None]
    table = Table(
        title=f"dbresilience demo: {result.threads} threads, {result.duration:g} s per engine",
        caption=(
            "resilient = create_resilient_engine(url)"
            + (", plain = create_engine(url)" if result.plain else "")
            + f"; pool_size={result.threads}"
        ),
    )
    table.add_column("", no_wrap=True)
    for run in runs:
        table.add_column(run.engine, justify="right")

    def row(label: str, cell: Callable[[EngineRun], str]) -> None:
        table.add_row(label, *(cell(r) for r in runs))

    def recovery(key: str) -> Callable[[EngineRun], str]:
        return lambda r: str(r.recoveries[key]) if r.recoveries else "n/a"

    row("transactions attempted", lambda r: str(r.attempted))
    row("succeeded (acknowledged)", lambda r: str(r.succeeded))
    row("errors surfaced to the app", lambda r: f"[bold]{r.errors_surfaced}[/]")
    row("  by exception class", lambda r: _fmt_counts(r.errors))
    row("silent recoveries: replays", recovery("replay.statement"))
    row("  dead before use", recovery("dead.replaced"))
    row("  connect retries", recovery("retry.connect"))
    row("ledger: rows in table", lambda r: str(r.rows_in_table))
    row("  acknowledged, missing", lambda r: _zero_good(r.missing_acknowledged))
    row("  raised, yet committed", lambda r: str(r.outcome_unknown))
    row("longest gap between commits", lambda r: f"{r.longest_gap:.2f} s")
    row("log lines held back", lambda r: _fmt_counts(r.log_lines))
    if any(r.hung_workers for r in runs):
        row("workers still running", lambda r: _zero_good(r.hung_workers))
    console.print(table)

    timeline = Table(
        title="fault timeline",
        caption="errors: surfaced from this fault until the next one; times from the first run",
    )
    timeline.add_column("at", justify="right")
    timeline.add_column("fault")
    for run in runs:
        timeline.add_column(f"{run.engine} errors", justify="right")
    for i, fault in enumerate(runs[0].faults):
        what = (
            f"kill all backends ({fault.backends_killed})"
            if fault.action == "kill"
            else f"restart, up again after {fault.took:.2f} s"
        )
        timeline.add_row(f"+{fault.at:.2f} s", what, *(str(r.errors_by_fault[i]) for r in runs))
    console.print(timeline)
    if result.plain is not None:
        console.print(
            f"Errors surfaced: [bold]{result.resilient.errors_surfaced}[/] with "
            f"create_resilient_engine() vs [bold]{result.plain.errors_surfaced}[/] with "
            "create_engine(), under the same faults."
        )
    if result.resilient.outcome_unknown or (result.plain and result.plain.outcome_unknown):
        console.print(
            "'raised, yet committed': the error surfaced at COMMIT and the row did commit; "
            "the application cannot tell without checking (outcome unknown)."
        )
    if result.ok:
        console.print("[green]Every acknowledged write is in the ledger.[/]")
    else:
        console.print("[bold red]The demo failed: see the ledger check above.[/]")
    console.out(json.dumps({"dbresilience_demo": result.to_dict()}), highlight=False)
