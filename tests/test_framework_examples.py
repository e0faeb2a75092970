"""The framework examples in examples/ run for real against real servers, under faults."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, event, select

from dbresilience import DisconnectError, get_stats, run_transaction
from dbresilience._engine_hooks import resilience_of
from dbresilience.testing import PostgresCluster
from dbresilience.testing._cluster import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _load(name: str) -> ModuleType:
    """Import examples/<name>.py as a module of its own."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# -- FastAPI ------------------------------------------------------------------------------


@pytest.fixture(params=["asyncpg", "psycopg"])
def fastapi_server(pg: PostgresCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """examples/fastapi_app.py under a real uvicorn on the test's own server; its base URL."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": pg.url(str(request.param))}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "fastapi_app:app",
            "--app-dir",
            str(EXAMPLES),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "uvicorn exited"
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "uvicorn did not start in 30 s"
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_fastapi_burst_through_a_restart_fails_no_request(
    pg: PostgresCluster, fastapi_server: str, request: pytest.FixtureRequest
) -> None:
    driver = request.node.callspec.params["fastapi_server"]
    clients, restart_at, then = 24, 1.0, 2.0  # restart 1 s in; go on 2 s after it
    spans: list[tuple[float, float]] = []  # (start, end) of every request, monotonic s
    failures: list[str] = []
    acknowledged: set[int] = set()
    down: list[float] = []  # when the restart began and when the server was back

    async def call(client: httpx.AsyncClient, method: str, path: str, **kw: Any) -> Any:
        start = time.monotonic()
        try:
            response = await client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            failures.append(f"{method} {path}: {exc!r}")
            return None
        finally:
            spans.append((start, time.monotonic()))
        if response.status_code != 200:
            failures.append(f"{method} {path}: {response.status_code} {response.text[:200]}")
            return None
        return response.json()

    async def client_loop(client: httpx.AsyncClient, n: int, stop: asyncio.Event) -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            item = f"c{n}-{seq}"
            placed = await call(client, "POST", "/orders", json={"item": item})
            if placed is None:
                continue
            acknowledged.add(placed["id"])
            got = await call(client, "GET", f"/orders/{placed['id']}")
            if got is not None and got["item"] != item:
                failures.append(f"order {placed['id']} is {got['item']!r}, not {item!r}")

    async def burst() -> None:
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(base_url=fastapi_server, timeout=60, limits=limits) as client:
            stop = asyncio.Event()
            loops = [asyncio.create_task(client_loop(client, n, stop)) for n in range(clients)]
            await asyncio.sleep(restart_at)
            down.append(time.monotonic())
            await asyncio.to_thread(pg.restart, down_for=1.0)
            down.append(time.monotonic())
            await asyncio.sleep(then)
            stop.set()
            await asyncio.gather(*loops)

    asyncio.run(burst())
    longest = max(end - start for start, end in spans)
    across = sum(1 for start, end in spans if start < down[1] and end > down[0])
    after = sum(1 for start, _ in spans if start > down[1])
    print(
        f"\nFastAPI ({driver}), {clients} concurrent clients, server restarted (down 1 s) "
        f"{restart_at:.0f} s in: "
        f"{len(spans)} requests sent, {len(failures)} failed, longest {longest:.3f} s "
        f"({across} in flight during the restart, {after} sent after it)"
    )
    assert not failures, failures[:5]
    assert across >= clients and after > 0  # the burst did span the restart
    # Every acknowledged order is in the table, exactly once.
    rows = pg.execute("select id from fastapi_orders")
    assert acknowledged <= {int(str(r[0])) for r in rows}
    assert len(rows) == len({r[0] for r in rows})

    # Readiness follows the database; liveness never asks it.
    pg.stop()
    start = time.monotonic()
    ready = httpx.get(f"{fastapi_server}/readyz", timeout=10)
    assert ready.status_code == 503
    assert time.monotonic() - start < 3.0  # check_health_async's 2 s bound
    assert ready.json()["reachable"] is False
    assert httpx.get(f"{fastapi_server}/healthz", timeout=10).status_code == 200
    pg.start()
    assert httpx.get(f"{fastapi_server}/readyz", timeout=10).status_code == 200


# -- Flask-SQLAlchemy: configured through its URL only --------------------------------------


def test_flask_app_made_resilient_by_its_url_alone(shared_pg: PostgresCluster) -> None:
    example = _load("flask_app")
    url = (
        f"{shared_pg.url()}?plugin=dbresilience&application_name=flask_example"
        "&dbresilience_command_timeout=20"
    )
    app = example.create_app(url)
    client = app.test_client()
    with app.app_context():
        engine = example.db.engine
    assert resilience_of(engine).policy.command_timeout == 20.0
    assert "dbresilience" not in str(engine.url)

    assert client.post("/notes", json={"text": "first"}).status_code == 200
    for text in ("after a kill", "after another kill"):
        assert shared_pg.terminate_backends(application_name="flask_example") == 1
        time.sleep(0.05)  # the FATAL reaches the pooled connection's socket
        response = client.post("/notes", json={"text": text})  # INSERT: first statement
        assert response.status_code == 200, response.text
    shared_pg.terminate_backends(application_name="flask_example")
    time.sleep(0.6)  # past the liveness window: caught at checkout
    notes = client.get("/notes").get_json()["notes"]
    assert notes[-3:] == ["first", "after a kill", "after another kill"]
    stats = get_stats(engine)
    assert stats.get("replay.statement", 0) + stats.get("dead.replaced", 0) == 3
    with app.app_context():  # the docstring's exactly-once unit of work
        added = run_transaction(example.db.session(), lambda s: s.add(example.Note(text="once")))
        assert added is None
        assert example.db.session.scalars(select(example.Note.text)).all()[-1] == "once"
        example.db.session.remove()  # its connection back to the pool, which dispose() closes
        example.db.engine.dispose()


# -- SQLModel -------------------------------------------------------------------------------


def test_sqlmodel_example(shared_pg: PostgresCluster) -> None:
    example = _load("sqlmodel_app")
    engine = example.make_engine(f"{shared_pg.url()}?application_name=sqlmodel_example")
    try:
        assert resilience_of(engine).policy.attempts == 5
        example.add_hero(engine, "Deadpond", 3)
        shared_pg.terminate_backends(application_name="sqlmodel_example")
        time.sleep(0.05)
        example.add_hero(engine, "Rusty-Man", 9)
        assert example.strongest(engine, 2)[0] == "Rusty-Man"
        assert get_stats(engine).get("replay.statement", 0) == 1
    finally:
        engine.dispose()
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "sqlmodel_app.py")],
        env={**os.environ, "DATABASE_URL": shared_pg.url()},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out.startswith("strongest: ['Rusty-Man'")


# -- Alembic --------------------------------------------------------------------------------

ALEMBIC_INI = EXAMPLES / "alembic_migrations" / "alembic.ini"


def _tables(pg: PostgresCluster, database: str) -> set[str]:
    rows = pg.execute(
        "select tablename from pg_tables where schemaname = 'public'", database=database
    )
    return {str(r[0]) for r in rows}


def test_alembic_upgrade_head_through_a_resilient_engine(shared_pg: PostgresCluster) -> None:
    shared_pg.create_database("alembic_cli")
    url = shared_pg.url(database="alembic_cli")
    subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ALEMBIC_INI), "upgrade", "head"],
        env={**os.environ, "DATABASE_URL": url},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert _tables(shared_pg, "alembic_cli") == {"accounts", "alembic_version"}
    version = shared_pg.execute("select version_num from alembic_version", database="alembic_cli")
    assert version == [("0002",)]


def test_alembic_migration_whose_connection_dies_rolls_back_and_reruns(
    shared_pg: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alembic import command
    from alembic.config import Config

    shared_pg.create_database("alembic_kill")
    monkeypatch.setenv("DATABASE_URL", shared_pg.url(database="alembic_kill"))
    config = Config(str(ALEMBIC_INI))
    config.attributes["configure_logger"] = False  # keep pytest's logging as it is

    def kill_before_the_index(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("CREATE UNIQUE INDEX"):  # mid-transaction, in migration 0002
            pid = conn.connection.dbapi_connection.info.backend_pid
            shared_pg.execute(f"select pg_terminate_backend({pid})")
            while shared_pg.execute(f"select 1 from pg_stat_activity where pid = {pid}"):
                time.sleep(0.01)

    event.listen(Engine, "before_cursor_execute", kill_before_the_index)
    try:
        with pytest.raises(DisconnectError):
            command.upgrade(config, "head")
    finally:
        event.remove(Engine, "before_cursor_execute", kill_before_the_index)
    # One transaction: the CREATE TABLE of 0001 and the version table are gone with it.
    assert _tables(shared_pg, "alembic_kill") == set()
    command.upgrade(config, "head")  # simply run again
    assert _tables(shared_pg, "alembic_kill") == {"accounts", "alembic_version"}
