"""Testing kit: real PostgreSQL clusters and a TCP chaos proxy for fault injection."""

from __future__ import annotations

from dbresilience.testing._chaos import ChaosMode, ChaosProxy, ChaosStats
from dbresilience.testing._cluster import PostgresCluster, find_pg_bindir, free_port

__all__ = [
    "ChaosMode",
    "ChaosProxy",
    "ChaosStats",
    "PostgresCluster",
    "find_pg_bindir",
    "free_port",
]
