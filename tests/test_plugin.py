"""The ``dbresilience`` SQLAlchemy URL plugin: ``?plugin=dbresilience`` on real servers.

Needs the package installed (the ``sqlalchemy.plugins`` entry point), as ``pip install -e``
does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import dbresilience
from dbresilience import (
    ConfigurationError,
    Policy,
    async_session_factory,
    get_stats,
    run_async_transaction,
    run_transaction,
)
from dbresilience._engine_hooks import resilience_of
from dbresilience.testing import PostgresCluster

PLUGIN = "plugin=dbresilience"


def _captured_connect_params(engine: Engine) -> list[dict[str, Any]]:
    """Every set of keyword arguments the driver's connect() is called with."""
    seen: list[dict[str, Any]] = []

    @event.listens_for(engine, "do_connect")
    def capture(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        seen.append(dict(cparams))

    return seen


@pytest.fixture
def sync_engine(shared_pg: PostgresCluster) -> Iterator[Engine]:
    url = (
        f"{shared_pg.url()}?{PLUGIN}&application_name=plugin_sync"
        "&dbresilience_command_timeout=7&dbresilience_verify_commits=false"
        "&dbresilience_attempts=4"
    )
    engine = create_engine(url, pool_size=2, max_overflow=0)
    yield engine
    engine.dispose()


def test_url_plugin_gives_a_resilient_engine(
    shared_pg: PostgresCluster, sync_engine: Engine
) -> None:
    seen = _captured_connect_params(sync_engine)
    policy = resilience_of(sync_engine).policy
    assert (policy.command_timeout, policy.verify_commits, policy.attempts) == (7.0, False, 4)
    assert "dbresilience" not in str(sync_engine.url)
    with sync_engine.connect() as conn:
        first = conn.execute(text("select pg_backend_pid()")).scalar_one()
    # The driver never saw our query parameters (psycopg would have refused them anyway).
    assert seen
    assert not [k for params in seen for k in params if "dbresilience" in k or k == "plugin"]
    assert shared_pg.terminate_backends(application_name="plugin_sync") == 1
    time.sleep(0.05)  # the FATAL reaches the socket, within the liveness window
    with sync_engine.begin() as conn:  # the first statement is replayed on a new connection
        assert conn.execute(text("select pg_backend_pid()")).scalar_one() != first
    assert get_stats(sync_engine)["replay.statement"] == 1
    assert run_transaction(sync_engine, lambda c: c.execute(text("select 42")).scalar_one()) == 42


def test_plugins_argument_and_policy_kwargs(shared_pg: PostgresCluster) -> None:
    engine = create_engine(
        shared_pg.url(),
        plugins=["dbresilience"],
        dbresilience_policy=Policy(attempts=3, deadline=5.0),
        dbresilience_deadline="2.5",  # strings parse, as from engine_from_config
        dbresilience_circuit_breaker=False,
        pool_size=1,
    )
    policy = resilience_of(engine).policy
    assert (policy.attempts, policy.deadline, policy.circuit_breaker) == (3, 2.5, False)
    with engine.connect() as conn:
        assert conn.execute(text("select 1")).scalar_one() == 1
    engine.dispose()


def test_engine_from_config_passes_the_plugin_through(shared_pg: PostgresCluster) -> None:
    from sqlalchemy import engine_from_config

    engine = engine_from_config(
        {
            "sqlalchemy.url": f"{shared_pg.url()}?{PLUGIN}",
            "sqlalchemy.dbresilience_command_timeout": "9",
        }
    )
    assert resilience_of(engine).policy.command_timeout == 9.0
    engine.dispose()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
@pytest.mark.asyncio
async def test_async_engine_through_the_plugin(shared_pg: PostgresCluster, driver: str) -> None:
    app = f"plugin_{driver}"
    connect_args: dict[str, Any] = (
        {"server_settings": {"application_name": app}}
        if driver == "asyncpg"
        else {"application_name": app}
    )
    engine = create_async_engine(
        f"{shared_pg.url(driver)}?{PLUGIN}&dbresilience_wait_max=0.5",
        connect_args=connect_args,
        dbresilience_attempts=5,
    )
    seen = _captured_connect_params(engine.sync_engine)
    state = resilience_of(engine)
    assert state.is_async
    assert (state.policy.wait_max, state.policy.attempts) == (0.5, 5)
    async with engine.connect() as conn:
        first = (await conn.execute(text("select pg_backend_pid()"))).scalar_one()
    assert not [k for params in seen for k in params if "dbresilience" in k]
    assert shared_pg.terminate_backends(application_name=app) == 1
    await asyncio.sleep(0.05)
    async with engine.begin() as conn:
        assert (await conn.execute(text("select pg_backend_pid()"))).scalar_one() != first
    stats = get_stats(engine)
    # asyncpg reads the FATAL while idle (closed at checkout); psycopg finds out on use.
    assert stats.get("replay.statement", 0) + stats.get("dead.replaced", 0) == 1
    assert stats.get("error.disconnect", 0) == 0

    async def answer(session: AsyncSession) -> int:
        return int((await session.execute(text("select 42"))).scalar_one())

    assert await run_async_transaction(async_session_factory(engine), answer) == 42
    await engine.dispose()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("dbresilience_bogus=1", r"unknown dbresilience policy field 'bogus'.*known fields"),
        ("dbresilience_attempts=lots", r"bad value 'lots' for .*'attempts'.*an integer"),
        ("dbresilience_deadline=5s", r"bad value '5s' for .*'deadline'.*number of seconds"),
        ("dbresilience_verify_commits=maybe", r"bad value 'maybe' .*'verify_commits'.*true or"),
        ("dbresilience_attempts=0", r"Policy.attempts must be an integer >= 1, got 0"),
        ("dbresilience_command_timeout=-1", r"Policy.command_timeout must be >= 0.*got -1.0"),
        ("dbresilience_deadline=nan", r"Policy.deadline must be finite"),
        ("dbresilience_attempts=2&dbresilience_attempts=3", r"'dbresilience_attempts' given more"),
        ("dbresilience_idempotent=true", r"execution option, not a policy field"),
    ],
)
def test_bad_url_fields_name_the_field_and_value_never_the_password(
    query: str, message: str
) -> None:
    url = f"postgresql+psycopg://app:Sekr3t-pw@db.invalid/app?{PLUGIN}&{query}"
    with pytest.raises(ConfigurationError, match=message) as info:
        create_engine(url)
    assert "Sekr3t" not in str(info.value)


def test_bad_kwargs_are_errors_not_typeerrors() -> None:
    url = "postgresql+psycopg://app:Sekr3t-pw@db.invalid/app"
    with pytest.raises(ConfigurationError, match=r"unknown .* field 'retries'.*'dbresilience_ret"):
        create_engine(url, plugins=["dbresilience"], dbresilience_retries=3)
    with pytest.raises(ConfigurationError, match=r"Policy.wait_max must be a number, got b'1'"):
        create_engine(url, plugins=["dbresilience"], dbresilience_wait_max=b"1")
    with pytest.raises(
        ConfigurationError, match=r"dbresilience_policy must be a .*Policy, got dict"
    ):
        create_engine(url, plugins=["dbresilience"], dbresilience_policy={"attempts": 3})
    with pytest.raises(ConfigurationError, match=r"'attempts' given both in the URL query and"):
        create_engine(
            f"{url}?dbresilience_attempts=2", plugins=["dbresilience"], dbresilience_attempts=3
        )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:///x.db", r"PostgreSQL only, not 'sqlite'"),
        ("mysql+pymysql://app:Sekr3t-pw@h/db", r"PostgreSQL only, not 'mysql'"),
        ("postgresql+psycopg2://app:Sekr3t-pw@h/db", r"unsupported PostgreSQL driver 'psycopg2'"),
        ("postgresql+pg8000://app:Sekr3t-pw@h/db", r"unsupported PostgreSQL driver 'pg8000'"),
    ],
)
def test_other_databases_and_drivers_are_refused(url: str, message: str) -> None:
    sep = "&" if "?" in url else "?"
    with pytest.raises(ConfigurationError, match=message) as info:
        create_engine(f"{url}{sep}{PLUGIN}")
    assert "Sekr3t" not in str(info.value)


@pytest.mark.asyncio
async def test_sync_engine_on_asyncpg_as_sqlalchemys_own_test_suite_drives_it(
    shared_pg: PostgresCluster,
) -> None:
    # create_engine() with an asyncio driver gives a sync Engine that works inside
    # greenlet_spawn (what AsyncEngine does, and SQLAlchemy's test suite): it is accepted.
    from sqlalchemy.util import greenlet_spawn

    engine = create_engine(f"{shared_pg.url('asyncpg')}?{PLUGIN}")
    assert resilience_of(engine).is_async

    def work() -> int:
        with engine.connect() as conn:
            return int(conn.execute(text("select 1")).scalar_one())

    assert await greenlet_spawn(work) == 1
    await greenlet_spawn(engine.dispose)


def test_async_engine_refuses_other_drivers() -> None:
    with pytest.raises(ConfigurationError, match=r"unsupported PostgreSQL driver 'pg8000'"):
        create_async_engine(f"postgresql+pg8000://u@h/db?{PLUGIN}")


def test_plugin_engine_cannot_be_installed_twice(shared_pg: PostgresCluster) -> None:
    engine = create_engine(f"{shared_pg.url()}?{PLUGIN}")
    with pytest.raises(ConfigurationError, match="already installed"):
        dbresilience.install(engine)
    engine.dispose()
