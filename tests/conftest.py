"""Fixtures: real PostgreSQL servers started by the test-suite itself (no mocks).

The servers come from dbresilience's own pytest plugin (``dbresilience.testing.pytest_plugin``,
loaded by its ``pytest11`` entry point): ``shared_pg`` is its session server, ``pg`` a server
from its factory. The plugin is not listed in ``pytest_plugins`` (that would load it twice);
``pytest_configure`` below registers it only when the entry point did not (a source checkout
that was not reinstalled, or ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``), never against ``-p no:``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from _support import scram_cluster
from sqlalchemy import Engine

from dbresilience import create_resilient_engine
from dbresilience.testing import PostgresCluster

_PLUGIN = "dbresilience"


def pytest_configure(config: pytest.Config) -> None:
    manager = config.pluginmanager
    if not manager.has_plugin(_PLUGIN) and not manager.is_blocked(_PLUGIN):
        from dbresilience.testing import pytest_plugin

        if not manager.is_registered(pytest_plugin):
            manager.register(pytest_plugin, _PLUGIN)


@pytest.fixture(scope="session")
def shared_pg(dbr_postgresql_proc: PostgresCluster) -> PostgresCluster:
    """One server for tests that do not hurt it (the plugin's session server)."""
    return dbr_postgresql_proc


@pytest.fixture
def pg(dbr_postgresql_factory: Callable[..., PostgresCluster]) -> PostgresCluster:
    """A server of this test's own: restart it, stop it, kill its backends."""
    return dbr_postgresql_factory()


@pytest.fixture
def engine(pg: PostgresCluster) -> Iterator[Engine]:
    """A resilient psycopg engine on the test's own server."""
    eng = create_resilient_engine(pg.url(), pool_size=8, max_overflow=0)
    yield eng
    eng.dispose()


@pytest.fixture
def no_backoff(dbr_no_backoff: None) -> None:
    """Backoff sleeps off (the library's own testing switch, through the plugin)."""


@pytest.fixture(scope="session")
def scram_pg() -> Iterator[PostgresCluster]:
    """A server where role ``app`` must log in with a scram-sha-256 password."""
    yield from scram_cluster()
