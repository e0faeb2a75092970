"""The demo's report files: JSON (everything), a PNG chart and a self-contained HTML page.

The chart is drawn with matplotlib through its object-oriented API on the Agg (raster)
backend: no display, no pyplot global state, identical output on a laptop, a server and CI.
matplotlib is the long-maintained standard for static charts in Python, ships wheels for every
platform (no browser or system library needed, unlike plotly's kaleido export), and one PNG it
writes pastes into any design review; the HTML page embeds that same PNG (base64) and the
numbers behind it.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import json
from pathlib import Path
from typing import Any

from dbresilience.cli._demo import SCENARIOS, DemoResult, EngineRun

__all__ = ["COLORS", "render_png", "write_reports"]

COLORS = {"plain": "#d62728", "resilient": "#1f77b4", "run_transaction": "#2ca02c"}
"""Engine kind -> line colour (the same in the chart and the HTML)."""

_WINDOW_FAULTS = {"restart", "stop", "blackhole", "down", "rst-storm", "toxic"}


def have_matplotlib() -> bool:
    """True when matplotlib is installed (``pip install 'dbresilience[demo]'``)."""
    return importlib.util.find_spec("matplotlib") is not None


def _title(result: DemoResult) -> str:
    return (
        f"dbresilience demo: {result.scenario} ({result.driver}, {result.threads} workers per "
        f"engine, {result.elapsed:.0f} s)"
    )


def render_png(result: DemoResult, path: Path) -> None:
    """Throughput and errors over time per engine, fault windows shaded, breaker states."""
    from matplotlib.figure import Figure  # the OO API renders with Agg; no pyplot, no display

    fig = Figure(figsize=(11, 7.6), dpi=110, layout="constrained")
    grid = fig.add_gridspec(3, 1, height_ratios=[3.2, 2.2, 0.9])
    ops_ax = fig.add_subplot(grid[0])
    err_ax = fig.add_subplot(grid[1], sharex=ops_ax)
    brk_ax = fig.add_subplot(grid[2], sharex=ops_ax)
    width = result.bin_seconds
    for run in result.runs:
        t = [i * width for i in range(len(run.ops) + 1)]
        color = COLORS[run.engine]
        ops_ax.stairs(
            [n / width for n in run.ops],
            t,
            color=color,
            linewidth=1.6,
            label=f"{run.label}: {run.succeeded} ok",
        )
        err_ax.stairs(
            [n / width for n in run.error_series],
            t,
            color=color,
            linewidth=1.6,
            label=f"{run.label}: {run.errors_surfaced} errors",
        )
    resilient = [r for r in result.runs if r.breaker]
    states = {"open": "#d62728", "half-open": "#ff7f0e"}
    for row, run in enumerate(resilient):
        for state, color in states.items():
            spans = [(i * width, width) for i, s in enumerate(run.breaker) if s == state]
            if spans:
                brk_ax.broken_barh(spans, (row - 0.35, 0.7), color=color, label=state)
        brk_ax.broken_barh(
            [(i * width, width) for i, s in enumerate(run.breaker) if s == "closed"],
            (row - 0.35, 0.7),
            color="#c7e9c0",
        )
    brk_ax.set_yticks(range(len(resilient)), [r.label for r in resilient], fontsize=8)
    brk_ax.set_ylim(-0.6, max(len(resilient), 1) - 0.4)
    brk_ax.set_title(
        "circuit breaker (green closed, orange half-open, red open)", fontsize=9, loc="left"
    )
    for ax in (ops_ax, err_ax, brk_ax):
        for f in result.faults:
            end = f.ended if f.ended is not None else result.elapsed
            if f.fault in _WINDOW_FAULTS and end - f.started >= 0.05:
                ax.axvspan(f.started, end, color="#7f7f7f", alpha=0.18, linewidth=0)
            else:
                ax.axvline(f.started, color="#7f7f7f", linestyle="--", linewidth=1)
    top = max((n / width for r in result.runs for n in r.ops), default=1.0) or 1.0
    labelled: list[float] = []
    for f in result.faults:
        if all(abs(f.started - x) > result.elapsed / 25 for x in labelled):
            label = f"{f.fault} ({f.detail})" if f.fault == "restart" else f.fault
            ops_ax.annotate(label, (f.started, top * 1.02), fontsize=8, color="#404040")
            labelled.append(f.started)
    ops_ax.set_ylim(0, top * 1.15)
    ops_ax.set_ylabel("transactions acknowledged / s")
    ops_ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    ops_ax.set_title(_title(result), fontsize=11, loc="left")
    err_ax.set_yscale("symlog", linthresh=1)
    err_ax.set_ylim(0, None)
    err_ax.set_ylabel("errors surfaced / s\n(symlog)")
    err_ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    brk_ax.set_xlabel(
        "seconds since the workload started (grey: fault windows; dashed: instant faults)"
    )
    brk_ax.set_xlim(0, result.elapsed)
    for ax in (ops_ax, err_ax):
        ax.grid(True, axis="y", alpha=0.3)
        ax.tick_params(labelbottom=False)
    fig.savefig(path)


def _cell(value: Any) -> str:
    return f"<td>{html.escape(str(value))}</td>"


def _summary_rows(result: DemoResult) -> list[tuple[str, list[str]]]:
    def rec(r: EngineRun, key: str) -> str:
        return str(r.recoveries.get(key, 0)) if r.recoveries else "n/a"

    runs = result.runs
    return [
        ("transactions attempted", [str(r.attempted) for r in runs]),
        ("succeeded (acknowledged)", [str(r.succeeded) for r in runs]),
        ("errors surfaced to the app", [str(r.errors_surfaced) for r in runs]),
        (
            "  by exception class",
            [", ".join(f"{n} {k}" for k, n in r.errors.items()) or "-" for r in runs],
        ),
        ("statement replays", [rec(r, "replay.statement") for r in runs]),
        ("dead connections replaced before use", [rec(r, "dead.replaced") for r in runs]),
        ("lost connections seen", [rec(r, "disconnect") for r in runs]),
        ("pool invalidations", [rec(r, "invalidated.pool") for r in runs]),
        ("connect retries", [rec(r, "retry.connect") for r in runs]),
        ("transaction retries", [rec(r, "retry.transaction") for r in runs]),
        ("circuit breaker opened", [rec(r, "breaker.opened") for r in runs]),
        ("lost COMMITs: committed", [rec(r, "commit.committed") for r in runs]),
        ("lost COMMITs: aborted (retried)", [rec(r, "commit.aborted") for r in runs]),
        ("lost COMMITs: unknown (raised)", [rec(r, "commit.unknown") for r in runs]),
        ("acknowledged but missing (must be 0)", [str(r.missing_acknowledged) for r in runs]),
        ("raised, yet committed", [str(r.outcome_unknown) for r in runs]),
        ("longest gap between commits (s)", [f"{r.longest_gap:.2f}" for r in runs]),
    ]


def render_html(result: DemoResult, png: bytes | None) -> str:
    """One self-contained page: the chart (embedded PNG), the results, the faults, every
    engine's series, and the JSON result."""
    esc = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(_title(result))}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:80em}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}"
        "td,th{border:1px solid #ccc;padding:0.2em 0.6em;text-align:right}"
        "td:first-child,th:first-child{text-align:left}"
        ".series{display:flex;gap:1.5em;flex-wrap:wrap;align-items:flex-start}"
        ".series table{font-size:0.85em}img{max-width:100%;border:1px solid #ddd}"
        ".swatch{display:inline-block;width:0.8em;height:0.8em;margin-right:0.3em}</style>",
        "</head><body>",
        f"<h1>{esc(_title(result))}</h1>",
        f"<p>Scenario <b>{esc(result.scenario)}</b>: {esc(SCENARIOS[result.scenario])}. "
        f"Server: {esc(result.server)}. The engines ran at the same time, each with its own "
        "pool and table, through one chaos proxy.</p>",
    ]
    if png is not None:
        data = base64.b64encode(png).decode()
        parts.append(
            f'<img alt="throughput and errors over time per engine" '
            f'src="data:image/png;base64,{data}">'
        )
    parts += ["<h2>Results</h2>", "<table><tr><th></th>"]
    parts += [
        f'<th><span class="swatch" style="background:{COLORS[r.engine]}"></span>{esc(r.label)}</th>'
        for r in result.runs
    ]
    parts.append("</tr>")
    for label, cells in _summary_rows(result):
        parts.append(f"<tr>{_cell(label)}{''.join(_cell(c) for c in cells)}</tr>")
    parts.append("</table>")
    parts += [
        "<h2>Faults</h2>",
        "<table><tr><th>fault</th><th>from (s)</th><th>to (s)</th><th>detail</th></tr>",
    ]
    for f in result.faults:
        parts.append(
            f"<tr>{_cell(f.fault)}{_cell(f'{f.started:.2f}')}"
            f"{_cell(f'{f.ended:.2f}' if f.ended is not None else '-')}{_cell(f.detail)}</tr>"
        )
    parts.append("</table>")
    for note in result.notes:
        parts.append(f"<p>Note: {esc(note)}</p>")
    parts += [
        f"<h2>Series (per {result.bin_seconds:g} s)</h2>",
        '<div class="series">',
    ]
    for run in result.runs:
        parts.append(
            f'<table id="series-{run.engine}" data-engine="{run.engine}">'
            f"<caption>{esc(run.label)}</caption>"
            "<tr><th>t (s)</th><th>ok/s</th><th>errors/s</th><th>breaker</th></tr>"
        )
        for i, (ok, err) in enumerate(zip(run.ops, run.error_series, strict=True)):
            breaker = run.breaker[i] if run.breaker else "-"
            parts.append(
                f"<tr>{_cell(f'{i * result.bin_seconds:g}')}"
                f"{_cell(f'{ok / result.bin_seconds:g}')}"
                f"{_cell(f'{err / result.bin_seconds:g}')}{_cell(breaker)}</tr>"
            )
        parts.append("</table>")
    data_json = json.dumps(result.to_dict()).replace("</", "<\\/")
    parts += [
        "</div>",
        f'<script type="application/json" id="dbresilience-demo-result">{data_json}</script>',
        "</body></html>",
    ]
    return "\n".join(parts)


def write_reports(result: DemoResult, out_dir: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.png`` (when matplotlib is installed) and
    ``report.html`` into ``out_dir``; returns their paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    png: bytes | None = None
    if have_matplotlib():
        paths["png"] = out_dir / "report.png"
        render_png(result, paths["png"])
        png = paths["png"].read_bytes()
    paths["html"] = out_dir / "report.html"
    paths["html"].write_text(render_html(result, png))
    return paths
