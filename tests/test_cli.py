"""The ``dbresilience`` command line, and the demo run end to end on a real server."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dbresilience
from dbresilience.cli import _demo, main
from dbresilience.testing import PostgresCluster

REPO = Path(__file__).resolve().parents[1]


def series_rows(page: str, engine: str) -> list[tuple[float, float, float]]:
    """(t, ok/s, errors/s) rows of one engine's series table in the HTML report."""
    table = re.search(rf'<table id="series-{engine}".*?</table>', page, re.S)
    assert table is not None, f"no series table for {engine}"
    rows = re.findall(r"<tr><td>([\d.]+)</td><td>([\d.]+)</td><td>([\d.]+)</td>", table[0])
    return [(float(t), float(ok), float(err)) for t, ok, err in rows]


def test_demo_short_run_writes_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--duration", "6", "--threads", "3", "--out", str(tmp_path)]) == 0

    out = capsys.readouterr().out
    assert "fault: restart" in out  # plain-text progress: stdout is not a terminal
    assert "Every acknowledged write is in its ledger." in out
    assert not any(line.lstrip().startswith("{") for line in out.splitlines())  # no JSON here
    for name in ("report.json", "report.png", "report.html"):
        assert str(tmp_path / name) in out

    data = json.loads((tmp_path / "report.json").read_text())
    assert data["ok"] is True
    runs = {run["engine"]: run for run in data["runs"]}
    assert list(runs) == ["plain", "resilient", "run_transaction"]
    assert [f["fault"] for f in data["faults"]] == [
        "kill",
        "restart",
        "rst-storm",
        "kill",
        "kill",
        "restart",
    ]
    for run in runs.values():
        assert run["missing_acknowledged"] == 0
        assert run["hung_workers"] == 0
        assert run["attempted"] == run["succeeded"] + run["errors_surfaced"]
        assert run["rows_in_table"] == run["succeeded"] + run["outcome_unknown"]
        assert sum(run["ops"]) == run["succeeded"]
        assert sum(run["error_series"]) == run["errors_surfaced"]
        assert run["succeeded"] > 100
    plain, resilient, exactly_once = runs["plain"], runs["resilient"], runs["run_transaction"]
    assert plain["errors_surfaced"] > resilient["errors_surfaced"]
    assert exactly_once["errors_surfaced"] == 0  # run_transaction absorbs every fault here
    assert set(resilient["errors"]) <= set(dbresilience.__all__)  # classified, never raw
    assert resilient["recoveries"]["replay.statement"] > 0
    assert exactly_once["recoveries"]["retry.transaction"] > 0
    assert len(resilient["breaker"]) == len(resilient["ops"])

    png = (tmp_path / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    page = (tmp_path / "report.html").read_text()
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page  # self-contained
    for engine, run in runs.items():
        rows = series_rows(page, engine)
        assert [ok * data["bin_seconds"] for _, ok, _ in rows] == run["ops"]
        assert [err * data["bin_seconds"] for _, _, err in rows] == run["error_series"]


def test_demo_on_a_users_server_skips_what_needs_control_of_it(
    shared_pg: PostgresCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--url", shared_pg.url(), "--driver", "asyncpg", "--duration", "4"]
    assert main([*argv, "--threads", "2", "--out", str(tmp_path)]) == 0

    out = capsys.readouterr().out
    assert "skipped restart, outage: they need control of the server (--url)" in out
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["driver"] == "asyncpg"
    assert data["server"].startswith("postgresql+asyncpg://postgres@127.0.0.1:")
    assert [f["fault"] for f in data["faults"]] == ["kill", "rst-storm", "kill", "kill"]
    assert all(run["missing_acknowledged"] == 0 for run in data["runs"])
    assert data["faults"][0]["detail"] != "0 backends"  # killed through the URL's own role
    leftover = shared_pg.execute(
        "select count(*) from pg_tables where tablename like 'dbresilience_demo_%'"
    )
    assert leftover == [(0,)]
    assert shared_pg.is_running()


def test_demo_says_when_the_users_server_is_unreachable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = "postgresql+psycopg://app:Sekr3t-pw@127.0.0.1:1/app"  # nothing listens on port 1
    assert main(["demo", "--url", url, "--duration", "2"]) == 1
    err = capsys.readouterr().err
    assert "cannot use postgresql+psycopg://app:***@127.0.0.1:1/app" in err
    assert "Sekr3t" not in err
    assert "Traceback" not in err


@pytest.mark.parametrize("scenario", list(_demo.SCENARIOS))
@pytest.mark.parametrize("duration", [3.0, 45.0, 600.0])
def test_fault_scripts_fit_the_duration(scenario: str, duration: float) -> None:
    script = _demo.fault_script(scenario, duration)
    assert script
    assert [f.at for f in script] == sorted(f.at for f in script)
    assert all(0 < f.at < duration for f in script)
    assert all(f.seconds >= 0.5 for f in script if f.action != "kill")


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
        (["demo", "--scenario", "earthquake"], "invalid choice"),
        (["demo", "--driver", "pg8000"], "invalid choice"),
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
    assert "--scenario" in done.stdout and "rst-storm" in done.stdout
