"""The examples run for real (docker/ is checked by test_docker_compose.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dbresilience.testing import PostgresCluster

ROOT = Path(__file__).resolve().parent.parent


def test_sync_example_runs_against_a_real_server(shared_pg: PostgresCluster) -> None:
    env = {**os.environ, "DATABASE_URL": shared_pg.url()}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sync_app.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "placed;" in out
    rows = shared_pg.execute("select item from example_orders order by id")
    assert [r[0] for r in rows][-2:] == ["unchanged app code", "exactly once"]


def test_chaos_test_suite_passes() -> None:
    """examples/chaos_tests is a user's suite: its own pytest.ini and conftest, the plugin from
    the entry point. So it runs as its own pytest session, the way its users would run it,
    rather than being collected into this one (whose config and fixtures it must not need)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q"],
        cwd=ROOT / "examples" / "chaos_tests",
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "6 passed" in out, out
    assert "skipped" not in out, out
