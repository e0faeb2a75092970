"""Fixtures: real PostgreSQL servers started by the test-suite itself (no mocks)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from _support import scram_cluster
from sqlalchemy import Engine

from dbresilience import create_resilient_engine, set_testing
from dbresilience.testing import PostgresCluster


@pytest.fixture(scope="session")
def shared_pg() -> Iterator[PostgresCluster]:
    """One server for tests that do not hurt it."""
    cluster = PostgresCluster()
    cluster.start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg() -> Iterator[PostgresCluster]:
    """A server of this test's own: restart it, stop it, kill its backends."""
    cluster = PostgresCluster()
    cluster.start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def engine(pg: PostgresCluster) -> Iterator[Engine]:
    """A resilient psycopg engine on the test's own server."""
    eng = create_resilient_engine(pg.url(), pool_size=8, max_overflow=0)
    yield eng
    eng.dispose()


@pytest.fixture
def no_backoff() -> Iterator[None]:
    """Backoff sleeps off (the library's own testing switch)."""
    with set_testing(True):
        yield


@pytest.fixture(scope="session")
def scram_pg() -> Iterator[PostgresCluster]:
    """A server where role ``app`` must log in with a scram-sha-256 password."""
    yield from scram_cluster()
