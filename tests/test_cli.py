"""The ``dbresilience`` command line, and the demo run end to end on a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dbresilience
from dbresilience.cli import _demo, main

REPO = Path(__file__).resolve().parents[1]


def test_demo_end_to_end(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    results: list[_demo.DemoResult] = []
    real_run_demo = _demo.run_demo

    def recording_run_demo(**kwargs: object) -> _demo.DemoResult:
        result = real_run_demo(**kwargs)  # type: ignore[arg-type]
        results.append(result)
        return result

    monkeypatch.setattr(_demo, "run_demo", recording_run_demo)
    threads = 4

    assert main(["demo", "--threads", str(threads), "--duration", "5"]) == 0

    out = capsys.readouterr().out
    assert "create_resilient_engine(url)" in out
    assert "create_engine(url)" in out
    assert "Every acknowledged write is in the ledger." in out
    summary_line = next(line for line in out.splitlines() if line.startswith('{"dbresilience'))
    summary = json.loads(summary_line)["dbresilience_demo"]

    (result,) = results
    assert summary == json.loads(json.dumps(result.to_dict()))
    assert result.ok
    resilient, plain = result.resilient, result.plain
    assert plain is not None

    faults = resilient.faults
    assert [f.action for f in faults] == [a for _, a in _demo.FAULT_SCRIPT]
    assert all(f.backends_killed > 0 for f in faults if f.action == "kill")
    assert [f.action for f in plain.faults] == [f.action for f in faults]

    for run in (resilient, plain):
        assert run.hung_workers == 0
        assert run.missing_acknowledged == 0
        assert run.attempted == run.succeeded + run.errors_surfaced
        assert run.rows_in_table == run.succeeded + run.outcome_unknown
        assert sum(run.errors_by_fault) == run.errors_surfaced
        assert run.succeeded > 100

    # At most one error per transaction in flight when a fault hits.
    assert resilient.errors_surfaced <= threads * len(faults)
    assert plain.errors_surfaced > resilient.errors_surfaced
    assert set(resilient.errors) <= set(dbresilience.__all__)  # classified, never raw
    assert resilient.recoveries["replay.statement"] > 0
    assert resilient.recoveries["retry.connect"] > 0
    assert plain.recoveries == {}
    assert summary["resilient"]["errors_surfaced"] == resilient.errors_surfaced
    assert summary["plain"]["errors_surfaced"] == plain.errors_surfaced
    # Retry log lines were counted, not printed.
    assert resilient.log_lines.get("dbresilience", 0) > 0
    assert "retrying" not in out
    assert "retrying" not in capsys.readouterr().err


def test_help_returns_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: dbresilience" in out
    assert "demo" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required"),
        (["bogus"], "invalid choice"),
        (["demo", "--threads", "0"], "must be >= 1"),
        (["demo", "--duration", "soon"], "not a number"),
        (["demo", "--what"], "unrecognized arguments"),
    ],
)
def test_usage_errors_return_two(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: dbresilience" in err
    assert message in err


def test_python_dash_m() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "dbresilience.cli", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "--no-compare" in done.stdout
