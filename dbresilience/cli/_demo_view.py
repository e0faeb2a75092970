"""The demo on the terminal: a live view while it runs (rich; plain lines when the output is not
a terminal) and the comparison table at the end."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from dbresilience.cli._demo import (
    ENGINES,
    SCENARIOS,
    DemoResult,
    EngineKind,
    EngineRun,
    LiveState,
)

__all__ = ["live_view", "print_result"]

_SPARK = "▁▂▃▄▅▆▇█"
_SPARK_SECONDS = 30
_PLAIN_EVERY = 5.0  # seconds between status lines without a terminal
_BREAKER_STYLE = {"closed": "green", "half-open": "yellow", "open": "bold red", "": "dim"}


def _spark(state: LiveState, kind: EngineKind, now: float) -> str:
    """Acknowledged transactions per second over the last 30 s, as a sparkline."""
    tally = state.tallies[kind]
    start = now - _SPARK_SECONDS
    counts = [0] * _SPARK_SECONDS
    with tally.lock:
        times = list(tally.ok_times[-20000:])
    for t in times:
        i = int(t - state.t0 - start) if state.t0 else -1
        if 0 <= i < _SPARK_SECONDS:
            counts[i] += 1
    top = max(counts) or 1
    first = max(0, int(-start))  # seconds before the run are blank
    return " " * first + "".join(
        _SPARK[min(len(_SPARK) - 1, c * (len(_SPARK) - 1) // top)] if c else " "
        for c in counts[first:]
    )


def _render(state: LiveState) -> RenderableType:
    now = state.now()
    title = (
        f"dbresilience demo — scenario [bold]{state.scenario}[/] ({SCENARIOS[state.scenario]}), "
        f"driver {state.driver}"
    )
    progress = f"{state.phase}: {now:5.1f} s of {state.duration:g} s" if state.t0 else state.phase
    engines = Table(title=progress, title_justify="left", expand=False)
    engines.add_column("engine", no_wrap=True)
    engines.add_column("ops/s", justify="right")
    engines.add_column(f"last {_SPARK_SECONDS} s", no_wrap=True)
    engines.add_column("ok", justify="right")
    engines.add_column("errors surfaced", justify="right")
    engines.add_column("last error")
    engines.add_column("breaker")
    for kind in state.engines:
        tally = state.tallies[kind]
        errors = sum(tally.errors.values())
        breaker = state.breaker.get(kind, "") if kind != "plain" else ""
        engines.add_row(
            ENGINES[kind],
            f"{tally.rate(time.monotonic()):.0f}",
            _spark(state, kind, now),
            str(len(tally.acked)),
            Text(str(errors), style="bold red" if errors else "green"),
            tally.last_error or "-",
            Text(breaker or "n/a", style=_BREAKER_STYLE.get(breaker, "")),
        )
    faults = Table(title="fault timeline", title_justify="left", expand=False)
    faults.add_column("at", justify="right")
    faults.add_column("fault")
    faults.add_column("status")
    records = state.controller.timeline if state.controller is not None else []
    done = 0
    for index, fault in enumerate(state.script):
        if index in state.skipped:
            status = Text("skipped: needs server control", style="dim")
        elif fault.at > now or done >= len(records):
            status = Text("upcoming", style="dim")
        else:
            record = records[done]
            done += 1
            if record.ended is None:
                status = Text(f"▶ now ({now - record.started:.1f} s)", style="bold yellow")
            else:
                took = record.ended - record.started
                detail = f", {record.detail}" if record.detail else ""
                status = Text(f"done in {took:.2f} s{detail}", style="green")
        faults.add_row(f"+{fault.at:.1f} s", fault.describe(), status)
    return Group(Text.from_markup(title), engines, faults)


def _plain_line(state: LiveState) -> str:
    parts = []
    for kind in state.engines:
        tally = state.tallies[kind]
        breaker = state.breaker.get(kind, "")
        parts.append(
            f"{kind} {tally.rate(time.monotonic()):.0f}/s {sum(tally.errors.values())} err"
            + (f" (breaker {breaker})" if breaker not in ("", "closed") else "")
        )
    return f"+{state.now():5.1f} s  " + " | ".join(parts)


@contextmanager
def live_view(state_box: list[LiveState], console: Console) -> Iterator[None]:
    """Show the run in ``state_box[0]`` (set by the demo once it starts) until the block ends:
    a live table on a terminal, a status line every 5 s and one per fault otherwise."""
    stop = threading.Event()

    def plain() -> None:
        seen = 0
        last = 0.0
        while not stop.wait(0.2):
            if not state_box or not state_box[0].t0:
                continue
            state = state_box[0]
            records = state.controller.timeline if state.controller is not None else []
            for record in records[seen:]:
                console.print(f"+{record.started:5.1f} s  fault: {record.fault}", highlight=False)
            seen = len(records)
            if state.now() - last >= _PLAIN_EVERY:
                last = state.now()
                console.print(_plain_line(state), highlight=False)

    if not console.is_terminal:
        thread = threading.Thread(target=plain, name="dbresilience-demo-view", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(2)
        return

    def renderable() -> RenderableType:
        if not state_box:
            return Text("starting...")
        return _render(state_box[0])

    with Live(get_renderable=renderable, console=console, refresh_per_second=4, transient=False):
        yield


def _zero_good(n: int) -> str:
    return f"[green]{n}[/]" if n == 0 else f"[bold red]{n}[/]"


def _counts(counts: dict[str, int]) -> str:
    return "\n".join(f"{n} {name}" for name, n in counts.items()) or "-"


def print_result(result: DemoResult, console: Console, reports: dict[str, Path]) -> None:
    """The comparison table, the fault timeline, notes, and where the reports are."""
    table = Table(
        title=(
            f"dbresilience demo: {result.scenario}, {result.driver}, {result.threads} workers "
            f"per engine, {result.elapsed:.0f} s, all engines at once under the same faults"
        ),
        caption="\n".join(
            [f"{r.engine} = {r.label}" for r in result.runs] + [f"server: {result.server}"]
        ),
    )
    table.add_column("", no_wrap=True)
    for run in result.runs:
        table.add_column(run.engine, justify="right")

    def row(label: str, cell: Callable[[EngineRun], str]) -> None:
        table.add_row(label, *(cell(r) for r in result.runs))

    def recovery(key: str) -> Callable[[EngineRun], str]:
        return lambda r: str(r.recoveries.get(key, 0)) if r.recoveries else "n/a"

    def rate(r: EngineRun) -> str:
        return f"{r.succeeded / result.elapsed:.0f}" if result.elapsed else "-"

    row("transactions attempted", lambda r: str(r.attempted))
    row("succeeded (acknowledged)", lambda r: str(r.succeeded))
    row("  mean ops/s", rate)
    row("errors surfaced to the app", lambda r: f"[bold]{r.errors_surfaced}[/]")
    row("  by exception class", lambda r: _counts(r.errors))
    row("silent recoveries: replays", recovery("replay.statement"))
    row("  dead before use", recovery("dead.replaced"))
    row("  lost connections seen", recovery("disconnect"))
    row("  pool invalidations", recovery("invalidated.pool"))
    row("  connect retries", recovery("retry.connect"))
    row("  transaction retries", recovery("retry.transaction"))
    row("circuit breaker opened", recovery("breaker.opened"))
    row("lost COMMITs: committed", recovery("commit.committed"))
    row("  aborted (retried)", recovery("commit.aborted"))
    row("  unknown (raised)", recovery("commit.unknown"))
    row("ledger: rows in table", lambda r: str(r.rows_in_table))
    row("  acknowledged, missing", lambda r: _zero_good(r.missing_acknowledged))
    row("  raised, yet committed", lambda r: str(r.outcome_unknown))
    row("longest gap between commits", lambda r: f"{r.longest_gap:.2f} s")
    if any(r.hung_workers for r in result.runs):
        row("workers still running", lambda r: _zero_good(r.hung_workers))
    console.print(table)

    timeline = Table(title="faults (seconds from the start)")
    timeline.add_column("from", justify="right")
    timeline.add_column("to", justify="right")
    timeline.add_column("fault")
    timeline.add_column("detail")
    for f in result.faults:
        timeline.add_row(
            f"{f.started:.2f}", f"{f.ended:.2f}" if f.ended is not None else "-", f.fault, f.detail
        )
    console.print(timeline)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
    summary = ", ".join(f"{r.label} [bold]{r.errors_surfaced}[/]" for r in result.runs)
    console.print(f"Errors surfaced to the application: {summary}.")
    if any(r.outcome_unknown for r in result.runs):
        console.print(
            "'raised, yet committed': the error surfaced at COMMIT and the row did commit; "
            "the application cannot tell without checking (outcome unknown)."
        )
    if result.ok:
        console.print("[green]Every acknowledged write is in its ledger.[/]")
    else:
        console.print("[bold red]The demo failed: see the ledger rows above.[/]")
    for kind, path in reports.items():
        console.print(f"report ({kind}): {path}", highlight=False)
