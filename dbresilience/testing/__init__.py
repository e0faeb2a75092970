"""Testing kit: real PostgreSQL clusters and a TCP chaos proxy for fault injection."""

from __future__ import annotations

from dbresilience.testing._cluster import PostgresCluster, find_pg_bindir, free_port

__all__ = ["PostgresCluster", "find_pg_bindir", "free_port"]
