"""The pytest plugin: its fixtures in this suite, and how it loads in another project's."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Connection, text

from dbresilience import create_resilient_engine, run_transaction
from dbresilience._retrying import is_testing
from dbresilience.testing import ChaosProxy, FaultController, Latency, PostgresCluster


def test_faults_on_a_resilient_engine(
    dbr_chaos_url: str, dbr_faults: FaultController, dbr_database: str
) -> None:
    engine = create_resilient_engine(dbr_chaos_url, pool_size=2, max_overflow=0)

    def insert(conn: Connection) -> None:
        conn.execute(text("insert into t default values"))

    try:
        with engine.begin() as conn:
            conn.execute(text("create table t (id serial primary key)"))
        run_transaction(engine, insert)
        dbr_faults.restart(down_for=0.3)
        run_transaction(engine, insert)
        assert dbr_faults.kill_backends() >= 1  # the pooled connection, in this database only
        run_transaction(engine, insert)
        assert dbr_faults.reset_all() >= 1
        run_transaction(engine, insert)
        name = dbr_faults.add_toxic(Latency(latency=0.1))
        start = time.monotonic()
        run_transaction(engine, insert)
        assert time.monotonic() - start >= 0.2  # at least two round trips through the toxic
        dbr_faults.remove_toxic(name)
        dbr_faults.background(dbr_faults.blackhole, 0.5)
        time.sleep(0.1)
        run_transaction(engine, insert)  # waits for the link to come back
        dbr_faults.join()
        with engine.connect() as conn:
            assert conn.execute(text("select count(*) from t")).scalar_one() == 6
    finally:
        engine.dispose()
    timeline = dbr_faults.timeline
    assert [r.fault for r in timeline] == ["restart", "kill", "reset", "toxic", "blackhole"]
    assert all(r.ended is not None and r.ended >= r.started for r in timeline)
    assert timeline[0].ended is not None and timeline[0].ended - timeline[0].started >= 0.3
    assert timeline[3].detail == "latency_downstream"


def test_faults_are_healed_after_the_test(
    dbr_postgresql_proc: PostgresCluster, dbr_faults: FaultController
) -> None:
    dbr_faults.stop_server()
    dbr_faults.down()
    dbr_faults.heal()  # what the fixture does afterwards
    assert dbr_postgresql_proc.is_running()
    assert dbr_faults.proxy is not None and not dbr_faults.proxy.is_down
    assert all(r.ended is not None for r in dbr_faults.timeline)


def test_database_and_connection_fixtures(
    dbr_postgresql: psycopg.Connection[tuple[object, ...]],
    dbr_database: str,
    dbr_url: str,
    dbr_chaos_url: str,
    dbr_chaos_proxy: ChaosProxy,
) -> None:
    row = dbr_postgresql.execute("select current_database()").fetchone()
    assert row == (dbr_database,)
    assert dbr_url.startswith("postgresql+psycopg://") and dbr_url.endswith(f"/{dbr_database}")
    assert f":{dbr_chaos_proxy.port}/{dbr_database}" in dbr_chaos_url


@pytest.mark.dbr_no_backoff(attempts=2)
def test_marker_turns_backoff_off() -> None:
    assert is_testing()


def test_fixture_turns_backoff_off(dbr_no_backoff: None) -> None:
    assert is_testing()


def test_backoff_on_without_them() -> None:
    assert not is_testing()


USER_SUITE = """
import pytest

def test_uses_the_plugin(dbr_postgresql, dbr_chaos_url, dbr_faults):
    assert dbr_postgresql.execute("select 1").fetchone() == (1,)
    dbr_faults.reset_all()

@pytest.mark.dbr_no_backoff
def test_plain():
    pass
"""


def run_pytest(project: Path, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )
    return done.stdout + done.stderr


@pytest.fixture
def user_project(tmp_path: Path) -> Path:
    (tmp_path / "test_app.py").write_text(USER_SUITE)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\naddopts = --strict-markers\nasyncio_default_fixture_loop_scope = function\n"
    )
    return tmp_path


def test_another_project_gets_the_plugin_from_its_entry_point(user_project: Path) -> None:
    out = run_pytest(user_project)
    assert "2 passed" in out, out


def test_dash_p_no_turns_it_off(user_project: Path) -> None:
    # (without --strict-markers: the plugin registers its marker, and it is off)
    out = run_pytest(user_project, "-p", "no:dbresilience", "-o", "addopts=")
    assert "fixture 'dbr_postgresql' not found" in out, out
    assert "1 passed" in out and "1 error" in out, out


def test_dash_p_loads_it_without_autoload(user_project: Path) -> None:
    env = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    out = run_pytest(user_project, "-p", "dbresilience", env=env)
    assert "2 passed" in out, out
