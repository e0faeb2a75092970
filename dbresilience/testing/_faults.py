"""One object that injects every fault by name, for N seconds, and keeps a timeline.

:class:`FaultController` drives a :class:`PostgresCluster` (restart, stop, kill backends) and a
:class:`ChaosProxy` in front of it (blackhole, down, resets, toxics). Timed faults block for
their duration; :meth:`FaultController.background` runs one in a thread while the test drives
its workload. Every fault is recorded (:attr:`FaultController.timeline`) with its start and
end in seconds since the controller was made. The pytest plugin's ``dbr_faults`` fixture is
one of these; so is the demo's fault script.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from dbresilience.testing._chaos import ChaosProxy
from dbresilience.testing._cluster import PostgresCluster, StopMode
from dbresilience.testing._toxics import Toxic

__all__ = ["FaultController", "FaultRecord"]

_P = ParamSpec("_P")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class FaultRecord:
    """One fault on the timeline; times in seconds since the controller was made.

    :ivar fault: ``restart``, ``stop``, ``kill``, ``blackhole``, ``down``, ``reset``,
        ``rst-storm`` or ``toxic``.
    :ivar ended: when it was over (a restart: the server accepts connections again); equal to
        ``started`` for instant faults, ``None`` while still in force.
    :ivar detail: e.g. how many backends were killed, or the toxic.
    """

    fault: str
    started: float
    ended: float | None
    detail: str = ""


class FaultController:
    """Faults on a server and/or the chaos proxy in front of it.

    :param cluster: the server (restart, stop, kill backends); ``None`` for a server this
        process does not control (then only ``kill_backends`` works, through ``dsn``).
    :param proxy: the chaos proxy clients go through (blackhole, down, resets, toxics).
    :param database: :meth:`kill_backends` only kills sessions of this database by default.
    :param application_name: ... and only sessions with this ``application_name``.
    :param dsn: libpq connection string used to kill backends when there is no ``cluster``.
    """

    def __init__(
        self,
        cluster: PostgresCluster | None = None,
        proxy: ChaosProxy | None = None,
        *,
        database: str | None = None,
        application_name: str | None = None,
        dsn: str | None = None,
    ) -> None:
        self.cluster = cluster
        self.proxy = proxy
        self.database = database
        self.application_name = application_name
        self.dsn = dsn
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._timeline: list[FaultRecord] = []
        self._threads: list[threading.Thread] = []

    # -- timeline ---------------------------------------------------------------------------

    @property
    def timeline(self) -> list[FaultRecord]:
        """Every fault so far, in the order they started."""
        with self._lock:
            return sorted(self._timeline, key=lambda r: r.started)

    def reset_clock(self) -> None:
        """Count times from now on, and forget the timeline."""
        with self._lock:
            self._t0 = time.monotonic()
            self._timeline.clear()

    def now(self) -> float:
        """Seconds since the controller was made (or :meth:`reset_clock`)."""
        return time.monotonic() - self._t0

    @contextlib.contextmanager
    def _record(self, fault: str, detail: str = "") -> Iterator[list[str]]:
        """Record a fault spanning the block; the block may append to its detail."""
        started = self.now()
        extra = [detail] if detail else []
        placeholder = FaultRecord(fault, round(started, 3), None, detail)
        self._append(placeholder)
        try:
            yield extra
        finally:
            record = FaultRecord(fault, round(started, 3), round(self.now(), 3), " ".join(extra))
            with self._lock:
                for i, r in enumerate(self._timeline):
                    if r is placeholder:
                        self._timeline[i] = record

    def _append(self, record: FaultRecord) -> None:
        with self._lock:
            self._timeline.append(record)

    # -- running faults -----------------------------------------------------------------------

    def background(self, fault: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> None:
        """Run ``fault(*args, **kwargs)`` in a daemon thread and return at once, e.g.
        ``faults.background(faults.restart, down_for=1.0)``; :meth:`join` waits for it."""
        thread = threading.Thread(
            target=fault, args=args, kwargs=kwargs, name="dbresilience-fault", daemon=True
        )
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def join(self, timeout: float = 60.0) -> None:
        """Wait (at most ``timeout`` seconds in all) for faults run in the background;
        :class:`TimeoutError` if one is still running then (it stays joinable)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        running = [t for t in threads if t.is_alive()]
        if running:
            with self._lock:
                self._threads.extend(running)
            raise TimeoutError(f"{len(running)} background fault(s) still running after {timeout}s")

    def heal(self) -> None:
        """Undo everything: join background faults, proxy back to passthrough (no toxics, up),
        server started if stopped."""
        self.join()
        if self.proxy is not None:
            self.proxy.passthrough()
        if self.cluster is not None and not self.cluster.is_running():
            self.cluster.start()
        with self._lock:
            ended = round(time.monotonic() - self._t0, 3)
            self._timeline = [
                r if r.ended is not None else FaultRecord(r.fault, r.started, ended, r.detail)
                for r in self._timeline
            ]

    # -- server faults --------------------------------------------------------------------------

    def _server(self) -> PostgresCluster:
        if self.cluster is None:
            raise RuntimeError("this fault needs control of the server (a PostgresCluster)")
        return self.cluster

    def _chaos(self) -> ChaosProxy:
        if self.proxy is None:
            raise RuntimeError("this fault needs a ChaosProxy between clients and the server")
        return self.proxy

    def restart(self, *, down_for: float = 1.0, mode: StopMode = "fast") -> None:
        """Stop the server (``fast``: sessions get 57P01; ``immediate``: like a crash), keep it
        down ``down_for`` seconds (default 1), start it; returns once it accepts connections."""
        cluster = self._server()
        with self._record("restart", f"down {down_for:g} s"):
            cluster.restart(down_for=down_for, mode=mode)

    def stop_server(self, *, mode: StopMode = "fast") -> None:
        """Stop the server until :meth:`start_server` (or :meth:`heal`)."""
        cluster = self._server()
        self._append(FaultRecord("stop", round(self.now(), 3), None, mode))
        cluster.stop(mode)

    def start_server(self) -> None:
        """Start a stopped server and close the open ``stop`` on the timeline."""
        self._server().start()
        self._close_open("stop")

    def kill_backends(
        self, *, database: str | None = None, application_name: str | None = None
    ) -> int:
        """``pg_terminate_backend`` client sessions (default: those of the controller's
        ``database`` / ``application_name``); returns how many were killed."""
        database = database or self.database
        application_name = application_name or self.application_name
        with self._record("kill") as detail:
            if self.cluster is not None:
                killed = self.cluster.terminate_backends(
                    database=database, application_name=application_name
                )
            else:
                killed = self._kill_via_dsn(database, application_name)
            detail.append(f"{killed} backends")
        return killed

    def _kill_via_dsn(self, database: str | None, application_name: str | None) -> int:
        if self.dsn is None:
            raise RuntimeError("kill_backends needs a PostgresCluster or a dsn")
        import psycopg

        where = "pid <> pg_backend_pid() and backend_type = 'client backend'"
        params: list[str] = []
        if database is not None:
            where += " and datname = %s"
            params.append(database)
        if application_name is not None:
            where += " and application_name = %s"
            params.append(application_name)
        sql = (
            "select count(*) filter (where pg_terminate_backend(pid)) from pg_stat_activity "
            f"where {where}"
        )
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
            row = conn.execute(sql.encode(), params).fetchone()  # fixed text, bound values
        return int(str(row[0])) if row else 0

    # -- network faults (the proxy) -------------------------------------------------------------

    def blackhole(self, seconds: float | None = None) -> None:
        """Forward nothing (no data, no EOF, no reset: a dead link) for ``seconds``, then
        release everything buffered; ``None``: until :meth:`heal`."""
        proxy = self._chaos()
        if seconds is None:
            self._append(FaultRecord("blackhole", round(self.now(), 3), None))
            proxy.blackhole()
            return
        with self._record("blackhole", f"{seconds:g} s"):
            proxy.blackhole()
            time.sleep(seconds)
            proxy.passthrough()

    def down(self, seconds: float | None = None) -> None:
        """Reset every connection and refuse new ones (``ECONNREFUSED``) for ``seconds``;
        ``None``: until :meth:`heal`."""
        proxy = self._chaos()
        if seconds is None:
            self._append(FaultRecord("down", round(self.now(), 3), None))
            proxy.down()
            return
        with self._record("down", f"{seconds:g} s"):
            proxy.down()
            time.sleep(seconds)
            proxy.up()

    def reset_all(self) -> int:
        """Send a TCP RST on every connection through the proxy; returns how many."""
        with self._record("reset") as detail:
            n = self._chaos().reset_all()
            detail.append(f"{n} connections")
        return n

    def rst_storm(self, seconds: float, *, every: float = 0.3) -> int:
        """:meth:`reset_all` every ``every`` seconds (default 0.3) for ``seconds``; returns the
        connections reset."""
        proxy = self._chaos()
        total = 0
        with self._record("rst-storm", f"every {every:g} s") as detail:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                total += proxy.reset_all()
                time.sleep(max(0.0, min(every, end - time.monotonic())))
            detail.append(f"{total} connections")
        return total

    def add_toxic(self, toxic: Toxic, *, name: str | None = None) -> str:
        """Apply ``toxic`` until :meth:`remove_toxic`; returns its name."""
        key = self._chaos().add_toxic(toxic, name=name)
        self._append(FaultRecord("toxic", round(self.now(), 3), None, key))
        return key

    def remove_toxic(self, name: str) -> None:
        """Remove the toxic ``name`` and close it on the timeline."""
        self._chaos().remove_toxic(name)
        self._close_open("toxic", name)

    def toxic(self, toxic: Toxic, seconds: float, *, name: str | None = None) -> None:
        """Apply ``toxic`` for ``seconds``, then remove it."""
        key = self.add_toxic(toxic, name=name)
        try:
            time.sleep(seconds)
        finally:
            self.remove_toxic(key)

    def _close_open(self, fault: str, detail: str | None = None) -> None:
        with self._lock:
            for i, r in enumerate(self._timeline):
                if r.fault == fault and r.ended is None and detail in (None, r.detail):
                    ended = round(time.monotonic() - self._t0, 3)
                    self._timeline[i] = FaultRecord(r.fault, r.started, ended, r.detail)
