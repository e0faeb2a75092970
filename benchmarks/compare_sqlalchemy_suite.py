"""Is ``?plugin=dbresilience`` a drop-in? SQLAlchemy's own test suites, with and without it.

Downloads the sdist of the installed SQLAlchemy (``pip download --no-binary :all: --no-deps
sqlalchemy==<version>``), unpacks it and runs, from its directory, its PostgreSQL dialect,
engine, ORM-transaction and query suites with its own pytest plugin (``--dburi``) against a
fresh PostgreSQL server started here (:class:`dbresilience.testing.PostgresCluster`), twice
per driver: with the plain URL, then with ``?plugin=dbresilience`` (where every other
PostgreSQL engine the suite builds gets the plugin too, see ``_sa_suite_probe.py``)::

    python benchmarks/compare_sqlalchemy_suite.py                     # psycopg and asyncpg
    python benchmarks/compare_sqlalchemy_suite.py --drivers asyncpg --tests test/sql/test_query.py

Prints passed / failed / errors / skipped per driver and mode, how long each run took, and
every test whose outcome differs between the two modes (with the plugin run's error). Exit
status 1 when any differs. The installed SQLAlchemy is the one tested (``python -s``: the
sdist's ``lib/`` is not put on ``sys.path``). Needs pytest and the drivers; takes 9-11 minutes
for both drivers (four runs) on a 2-core machine (see the README). Not run in CI.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

if importlib.util.find_spec("dbresilience") is None:  # run from a checkout, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg

from dbresilience.testing import PostgresCluster

HERE = Path(__file__).resolve().parent
TESTS = [
    "test/dialect/postgresql",
    "test/engine",
    "test/orm/test_transaction.py",
    "test/sql/test_query.py",
]
OUTCOMES = ("passed", "failed", "error", "skipped")


@dataclass
class Run:
    driver: str
    mode: str
    seconds: float = 0.0
    outcomes: dict[str, str] = field(default_factory=dict)  # test id -> outcome
    messages: dict[str, str] = field(default_factory=dict)  # test id -> first error line
    probe: dict[str, object] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        values = list(self.outcomes.values())
        return {o: values.count(o) for o in OUTCOMES}


def unpacked_sdist(workdir: Path, version: str) -> Path:
    """The unpacked sdist of SQLAlchemy ``version`` in ``workdir`` (downloaded once)."""
    target = workdir / f"sqlalchemy-{version}"
    if (target / "test" / "conftest.py").exists():
        return target
    workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:"),
            *("--no-deps", f"sqlalchemy=={version}", "-d", str(workdir)),
        ],
        check=True,
    )
    archive = next(p for p in workdir.glob("*.tar.gz") if version in p.name)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(workdir, filter="data")
        else:  # pragma: no cover - Python < 3.11.4
            tar.extractall(workdir)  # PyPI's own sdist
    return target


def prepare_database(cluster: PostgresCluster) -> None:
    """The database the suite expects (README.unittests.rst): ``test`` in UTF8, English text
    search, schemas ``test_schema`` / ``test_schema_2``, hstore and citext."""
    dsn = f"host={cluster.host} port={cluster.port} user=postgres"
    with psycopg.connect(f"{dsn} dbname=postgres", autocommit=True) as conn:
        conn.execute("create database test encoding 'utf8' template template0")
        conn.execute("alter database test set default_text_search_config = 'pg_catalog.english'")
    with psycopg.connect(f"{dsn} dbname=test", autocommit=True) as conn:
        for sql in (
            "create schema test_schema",
            "create schema test_schema_2",
            "create extension hstore",
            "create extension citext",
        ):
            conn.execute(sql)


def parse_junit(path: Path, run: Run) -> None:
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                lines = (child.get("message") or child.text or "").strip().splitlines()
                message = lines[0] if lines else ""
                break
        # A teardown error after a pass is reported as a second entry: the worse one wins.
        if run.outcomes.get(test_id) in ("failed", "error"):
            continue
        run.outcomes[test_id] = outcome
        if message:
            run.messages[test_id] = message[:300]


def run_suite(sdist: Path, driver: str, mode: str, tests: list[str], workdir: Path) -> Run:
    """One run of ``tests`` against a fresh server; ``mode`` is ``plain`` or ``plugin``."""
    run = Run(driver, mode)
    cluster = PostgresCluster(settings={"max_prepared_transactions": "10"})
    cluster.start()
    try:
        prepare_database(cluster)
        url = cluster.url(driver, database="test")
        if mode == "plugin":
            url += "?plugin=dbresilience"
        xml = workdir / f"junit-{driver}-{mode}.xml"
        probe = workdir / f"probe-{driver}-{mode}.json"
        cmd = [sys.executable, "-s", "-m", "pytest", *tests, "--dburi", url]
        cmd += ["-p", "no:cacheprovider", "-p", "no:asyncio", "-p", "no:dbresilience"]
        cmd += ["-p", "_sa_suite_probe"]
        cmd += ["--maxfail=1000000", "-q", "--tb=short", f"--junitxml={xml}"]
        if importlib.util.find_spec("pytest_timeout") is not None:
            cmd += ["--timeout=300"]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
            "DBRESILIENCE_SA_SUITE_MODE": mode,
            "DBRESILIENCE_SA_SUITE_REPORT": str(probe),
        }
        log = workdir / f"pytest-{driver}-{mode}.log"
        start = time.monotonic()
        with log.open("w") as out:
            subprocess.run(cmd, cwd=sdist, env=env, stdout=out, stderr=subprocess.STDOUT)
        run.seconds = time.monotonic() - start
        if not xml.exists():
            raise RuntimeError(f"pytest wrote no report; see {log}")
        parse_junit(xml, run)
        if probe.exists():
            run.probe = json.loads(probe.read_text())
    finally:
        cluster.destroy()
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--drivers", nargs="+", default=["psycopg", "asyncpg"])
    parser.add_argument("--tests", nargs="+", default=TESTS, help="paths inside the sdist")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "dbresilience-sa-suite",
        help="where the sdist is unpacked and the reports/logs are written",
    )
    args = parser.parse_args(argv)
    version = importlib.metadata.version("sqlalchemy")
    sdist = unpacked_sdist(args.workdir, version)
    print(f"SQLAlchemy {version} suites from {sdist}: {' '.join(args.tests)}")
    differing = 0
    total_start = time.monotonic()
    for driver in args.drivers:
        runs = {
            mode: run_suite(sdist, driver, mode, args.tests, args.workdir)
            for mode in ("plain", "plugin")
        }
        for run in runs.values():
            c = run.counts()
            extra = ""
            if run.mode == "plugin":
                extra = (
                    f"  (main engine resilient: {run.probe.get('main_engine_resilient')}, "
                    f"engines with the plugin: {run.probe.get('engines_installed')})"
                )
            print(
                f"{driver:8} {run.mode:7} passed {c['passed']:5}  failed {c['failed']:4}  "
                f"errors {c['error']:4}  skipped {c['skipped']:5}  {run.seconds:6.0f} s{extra}"
            )
        plain, plugin = runs["plain"], runs["plugin"]
        diffs = sorted(
            t
            for t in plain.outcomes.keys() | plugin.outcomes.keys()
            if plain.outcomes.get(t) != plugin.outcomes.get(t)
        )
        differing += len(diffs)
        print(f"{driver}: {len(diffs)} tests differ")
        for t in diffs:
            print(f"  {t}: {plain.outcomes.get(t, 'absent')} -> {plugin.outcomes.get(t, 'absent')}")
            if t in plugin.messages and plugin.outcomes.get(t) != "skipped":
                print(f"      {plugin.messages[t]}")
    print(f"total {time.monotonic() - total_start:.0f} s; logs and reports in {args.workdir}")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
