"""The benchmarks still run (tiny budgets: this checks they work, not how fast anything is)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _summary(script: str, *args: str) -> dict[str, Any]:
    """Run a benchmark script; return the JSON summary of its last line."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


@pytest.mark.parametrize(
    ("script", "engines"),
    [
        ("bench_checkout.py", {"pre_ping", "resilient", "no_monitor"}),
        ("bench_commit.py", {"resilient_no_verify", "resilient"}),
        ("bench_async_checkout.py", {"pre_ping", "resilient"}),
        (
            "bench_instrumentation.py",
            {"otel_api_only", "otel_sdk", "otel_sdk_ops", "otel_sdk_none", "prometheus", "plain"},
        ),
    ],
)
def test_benchmark_runs_and_reports_ratios(script: str, engines: set[str]) -> None:
    summary = _summary(script, "--seconds", "0.05", "--rounds", "1")
    assert set(summary["paired_median_ratio"]) == engines
    assert all(ratio > 0 for ratio in summary["paired_median_ratio"].values())


def test_bytecode_counter_runs_and_sees_the_hooks() -> None:
    summary = _summary("count_bytecodes.py", "--ops", "20")
    assert summary["resilient"] > summary["plain"] > 0
    # Every op passes through the statement guard and the pool wrapper.
    assert summary["diff"]["dbresilience/_hooks/statements.py:guarded"] > 0
    assert summary["diff"]["dbresilience/_hooks/liveness.py:vetted"] > 0
