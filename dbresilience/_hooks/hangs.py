"""The hang monitor: a call waiting on a frozen server or a dead link is cut off in seconds,
and a slow query never is.

The watchdog already registers every blocking driver call (``watchdog.armed``: no cost added
per statement). One daemon thread per engine looks at them every :data:`TICK` seconds; a call
waiting longer than :attr:`Policy.hang_threshold` is looked into, through one monitoring
connection per server address (never from the app's pool, reused, every step bounded by
:attr:`Policy.hang_probe_timeout`), which asks ``pg_stat_activity`` about that connection's
backend:

* still ``active`` on the statement, or waiting on a lock: a slow query; looked at again
  every :data:`RECHECK` seconds;
* ``idle`` (the server finished and is waiting for the client), gone, or blocked writing to
  the client (``ClientWrite``): the link is dead; that connection is aborted (its socket shut
  down; a cancel request sent);
* no answer to :attr:`Policy.hang_probes` probes in a row: the host is hung; every call in
  flight to it is aborted and the pool's connections are replaced at their next checkout.

Behind a pooler the backend pid a connection knows is the pooler's (noticed at connect, when
the server's ``pg_backend_pid()`` differs): there only the host-level probe is made.

Aborted calls are reported by the ``handle_error`` hook (never replayed: inside a transaction
it did not commit, a retryable disconnect; in autocommit the outcome is unknown; during COMMIT
the commit check decides). The thread and the monitoring connections never keep the process
from exiting (daemon thread, closed at exit), are closed by ``engine.dispose()``, and start
again lazily (after a fork too, without touching the parent's connections).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from dbresilience import _sqla
from dbresilience._commit_outcome import SERVER_PID_KEY, SYSTEM_ID_KEY
from dbresilience._events import Invalidation
from dbresilience._hooks._state import EngineResilience
from dbresilience._hooks.connect import try_hosts_last
from dbresilience._observability import logger
from dbresilience._watchdog import watchdog

__all__ = ["HUNG_FOR", "RECHECK", "TICK", "HangMonitor", "try_hung_hosts_last"]

TICK = 0.2  # seconds between looks at the calls in flight
RECHECK = 1.0  # seconds between looks at the same slow query
CONFIRM = 0.3  # seconds: a link is found dead twice, this far apart, before it is aborted
HUNG_FOR = 30.0  # seconds a host found hung is tried last by new connections

_ACTIVITY_SQL = (
    "select pid, state, wait_event_type, wait_event from pg_stat_activity where pid = any({})"
)
_SYSTEM_ID_SQL = "select system_identifier::text from pg_control_system()"
# Connect arguments asyncpg.connect() takes (SQLAlchemy's dialect adds some of its own).
_ASYNCPG_ARGS = frozenset(
    {"host", "port", "user", "password", "database", "ssl", "server_settings", "direct_tls"}
)
_monitors: weakref.WeakSet[HangMonitor] = weakref.WeakSet()


class HangMonitor:
    """Watches the calls in flight of one engine (one monitoring connection per address)."""

    def __init__(self, state: EngineResilience, engine: Engine) -> None:
        self.state = state
        self.engine_ref = weakref.ref(engine)
        self.threshold = state.policy.hang_threshold
        self.behind_pooler: set[tuple[str, int]] = set()  # addresses: a pooler answers there
        # address -> the cluster the app's connections reached there: a monitoring connection
        # elsewhere (another server on that address, wrong parameters) must not judge.
        self.system_ids: dict[tuple[str, int], str] = {}
        self._probers: dict[tuple[str, int], _Prober] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._looked_at: dict[Any, float] = {}  # connection -> when its slow query was seen
        # connection -> (entry, when) its backend was first seen idle/gone while it waited: a
        # client that was just slow to read its reply would have moved on by the second look.
        self._seen_dead: dict[Any, tuple[Any, float]] = {}
        self._to_warm: set[tuple[str, int]] = set()
        # address -> when it was found hung: new connections try it last (multi-host URLs)
        self.hung: dict[tuple[str, int], float] = {}
        _monitors.add(self)

    # -- life cycle --------------------------------------------------------------------------

    def install(self, engine: Engine) -> None:
        """Listen to the pool's ``connect`` (after the facts are read: is a pooler in
        between?) and close the monitoring connections when ``engine.dispose()`` replaces the
        pool. (Not the ``engine_disposed`` event: any engine-level listener turns on
        SQLAlchemy's event dispatch for every statement of the engine.)"""
        event.listen(engine, "connect", self.on_connect)

        def on_recreate(pool: Any) -> None:
            self.close()
            _sqla.on_recreate(pool, on_recreate)

        _sqla.on_recreate(engine.pool, on_recreate)

    def on_connect(self, dbapi_conn: Any, record: Any) -> None:
        server_pid = record.info.get(SERVER_PID_KEY)
        driver = self.state.driver
        with contextlib.suppress(Exception):
            address = driver.address(dbapi_conn)
            if server_pid is not None and server_pid != driver.backend_pid(dbapi_conn):
                self.behind_pooler.add(address)
            system_id = record.info.get(SYSTEM_ID_KEY)
            if system_id is not None:
                self.system_ids[address] = system_id
            if address not in self._probers and address not in self.behind_pooler:
                # Connected ahead, not when a hang is suspected. Not through a pooler: an idle
                # client there is one more server login to redo after every server restart.
                self._to_warm.add(address)
        self.ensure_running()

    def ensure_running(self) -> None:
        """Start the thread if it is not running (called for every new connection)."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._run, name="dbresilience-hang-monitor", daemon=True
                )
                self._thread.start()

    def close(self) -> None:
        """Stop the thread and close the monitoring connections (``engine.dispose()``)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2 * self.state.policy.hang_probe_timeout + 1)
        with self._lock:
            self._thread = None
            probers, self._probers = list(self._probers.values()), {}
        for prober in probers:
            prober.close()

    def after_fork_in_child(self) -> None:
        """The parent's thread is gone and its connections are not ours to use or close."""
        self._lock = threading.Lock()
        self._thread = None
        self._stop = threading.Event()
        for prober in self._probers.values():
            prober.forget()
        self._probers = {}
        self._looked_at = {}
        self._seen_dead = {}
        self._to_warm = set()

    def hung_addresses(self, within: float = HUNG_FOR) -> set[tuple[str, int]]:
        """Addresses found hung less than ``within`` seconds ago."""
        now = time.monotonic()
        return {a for a, t in list(self.hung.items()) if now - t < within}

    @property
    def connections(self) -> int:
        """Monitoring connections open now."""
        return sum(1 for p in list(self._probers.values()) if p.connected)

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(TICK):
            try:
                while self._to_warm:
                    self._prober(self._to_warm.pop()).warm()
                self._look()
            except Exception:
                logger.exception("dbresilience hang monitor: a look failed")

    def _look(self) -> None:
        state = self.state
        now = time.monotonic()
        waiting: dict[tuple[str, int], list[tuple[Any, Any]]] = {}
        for connection, entry in list(state.armed.items()):
            if entry[1] is not state or now - entry[2] < self.threshold:
                continue
            if now - self._looked_at.get(connection, 0.0) < RECHECK:
                continue
            try:
                raw = getattr(connection, "dbapi_connection", connection)
                address = state.driver.address(raw)
                pid = state.driver.backend_pid(raw)
            except Exception:
                continue  # closed meanwhile
            waiting.setdefault(address, []).append((connection, entry, pid))  # type: ignore[arg-type]
        self._looked_at = {
            c: t for c, t in self._looked_at.items() if c in state.armed and now - t < 60
        }
        self._seen_dead = {c: v for c, v in self._seen_dead.items() if c in state.armed}
        for address, calls in waiting.items():
            self._judge(address, calls, now)

    def _prober(self, address: tuple[str, int]) -> _Prober:
        prober = self._probers.get(address)
        if prober is None:
            prober = self._probers[address] = _Prober(self, address)
        return prober

    def _judge(self, address: tuple[str, int], calls: list[Any], now: float) -> None:
        prober = self._prober(address)
        pooled = address in self.behind_pooler
        pids = [] if pooled else [pid for _, _, pid in calls if pid]
        state = self.state
        try:
            activity = prober.activity(pids)
        except _CannotJudge as exc:
            # The server answered but the probe could not ask (auth, another cluster...):
            # no verdict; command_timeout still bounds these calls.
            state.stats.incr("hang.no-verdict")
            logger.info("dbresilience hang monitor: no verdict for %s: %s", address, exc)
            for connection, _, _ in calls:
                self._looked_at[connection] = now
            return
        if activity is None:  # the host does not answer
            logger.warning(
                "dbresilience hang monitor: %s:%s does not answer; aborting its calls, engine=%s",
                address[0], address[1], state.name,
            )
            self.hung[address] = time.monotonic()
            # Every call in flight to it, not only those past the threshold: a call that began
            # waiting during the probes is as stuck, and would otherwise wait another round.
            for connection, entry in list(state.armed.items()):
                if entry[1] is not state:
                    continue
                try:
                    raw = getattr(connection, "dbapi_connection", connection)
                    if state.driver.address(raw) != address:
                        continue
                except Exception:
                    continue
                watchdog.cut(connection, entry, "host-hung")
            engine = self.engine_ref()
            if engine is not None:
                _sqla.invalidate_all(engine.pool)
                state.stats.emit(Invalidation(state.name, "pool", "host-hung"))
            return
        self.hung.pop(address, None)  # it answers again
        for connection, entry, pid in calls:
            row = None if pooled or not pid else activity.get(pid)
            if pooled or (row is not None and _still_working(row)):
                self._looked_at[connection] = now
                self._seen_dead.pop(connection, None)
                state.stats.incr("hang.slow")
                continue
            first = self._seen_dead.get(connection)
            if first is None or first[0] is not entry:
                self._seen_dead[connection] = (entry, now)
                self._looked_at[connection] = now - RECHECK + CONFIRM  # look again soon
                continue
            if now - first[1] < CONFIRM:
                continue
            del self._seen_dead[connection]
            logger.warning(
                "dbresilience hang monitor: backend %s is %s while its client waits: link dead, "
                "connection aborted, engine=%s",
                pid, "gone" if row is None else row[0], state.name,
            )
            watchdog.cut(connection, entry, "dead-link")


def try_hung_hosts_last(cparams: dict[str, Any], hung: set[tuple[str, int]]) -> bool:
    """Reorder a multi-host ``cparams`` (libpq's ``host``/``port`` lists as strings, or
    asyncpg's lists) so that the ``hung`` addresses come last; True if anything moved.

    libpq and asyncpg try the hosts in order, each for its whole connect timeout: a frozen
    former primary first in the list would cost every new connection that long.
    """
    return try_hosts_last(cparams, dict.fromkeys(hung, 0.0))


def _still_working(row: tuple[Any, ...]) -> bool:
    """``(state, wait_event_type, wait_event)``: running the statement, or waiting on a lock."""
    backend_state, wait_type, wait_event = row
    if backend_state not in ("active", "fastpath function call"):
        return False  # idle, idle in transaction...: done, the client is not listening
    return not (wait_type == "Client" and wait_event == "ClientWrite")


class _Prober:
    """One monitoring connection to one address, and the probes through it."""

    def __init__(self, monitor: HangMonitor, address: tuple[str, int]) -> None:
        self.monitor = monitor
        self.address = address
        self._conn: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._asyncpg = monitor.state.driver.name == "asyncpg"
        self._timed_out = False

    def _check_cluster(self, system_id: Any) -> None:
        expected = self.monitor.system_ids.get(self.address)
        if expected is not None and str(system_id) != expected:
            raise _CannotJudge(f"the monitoring connection reached another cluster ({system_id})")

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def warm(self) -> None:
        """Open the monitoring connection ahead of need, within ``connect_timeout``."""
        if self._conn is None:
            with contextlib.suppress(Exception):
                self._ask("select 1", self.monitor.state.policy.connect_timeout)

    def activity(self, pids: list[int]) -> dict[int, tuple[Any, ...]] | None:
        """``pid -> (state, wait_event_type, wait_event)`` for the pids still there, or None
        when the server did not answer ``hang_probes`` probes in a row (each within
        ``hang_probe_timeout``). :class:`_CannotJudge` when it answered, but not usefully
        (refused, authentication failed, another cluster)."""
        policy = self.monitor.state.policy
        sql = _ACTIVITY_SQL.format("'{" + ",".join(str(int(p)) for p in pids) + "}'::int[]")
        for _ in range(policy.hang_probes):
            self._timed_out = False
            try:
                rows = self._ask(sql, policy.hang_probe_timeout)
            except _CannotJudge:
                self.close()
                raise
            except Exception as exc:
                self.close()
                if not (self._timed_out or isinstance(exc, (TimeoutError, asyncio.TimeoutError))):
                    raise _CannotJudge(repr(exc)) from exc
                continue
            return {int(pid): (st, wt, we) for pid, st, wt, we in rows}
        return None

    def _ask(self, sql: str, timeout: float) -> list[tuple[Any, ...]]:
        if self._asyncpg:
            return self._ask_asyncpg(sql, timeout)
        deadline = time.monotonic() + timeout
        if self._conn is None:
            conn = _bounded(self._connect_psycopg, timeout)
            self._conn = conn
            self._check_cluster(conn.execute(_SYSTEM_ID_SQL).fetchone()[0])
            self.monitor.state.stats.incr("hang.monitor.connections")
        conn = self._conn
        watchdog.arm(max(0.05, deadline - time.monotonic()), conn, self)
        try:
            rows: list[tuple[Any, ...]] = conn.execute(sql).fetchall()
        finally:
            watchdog.disarm(conn)
        return rows

    # The watchdog bounds the probe's query (a Guarded of its own: not the app's statistics).

    def fileno(self, connection: Any) -> int:
        return int(connection.pgconn.socket)

    def cutting(self, connection: Any, reason: str) -> None:
        self._timed_out = True  # the probe's own bound: the server did not answer in time
        return None

    def overran(self, reason: str) -> None:
        return None

    def _connect_psycopg(self) -> Any:
        import psycopg

        params = self._params()
        params.update(autocommit=True, application_name="dbresilience-hang-monitor")
        params["connect_timeout"] = 2  # libpq's minimum; _bounded() gives up sooner
        # No server-side prepared statements: behind a transaction-mode pooler another
        # client's server connection would meet them ("_pg3_0" already exists).
        params["prepare_threshold"] = None
        return psycopg.connect(**params)

    def _ask_asyncpg(self, sql: str, timeout: float) -> list[tuple[Any, ...]]:
        import asyncpg

        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        loop = self._loop

        async def ask() -> list[tuple[Any, ...]]:
            if self._conn is None:
                kwargs = {k: v for k, v in self._params().items() if k in _ASYNCPG_ARGS}
                settings = dict(kwargs.get("server_settings") or {})
                settings["application_name"] = "dbresilience-hang-monitor"
                kwargs["server_settings"] = settings
                kwargs["statement_cache_size"] = 0  # unnamed statements only (poolers)
                self._conn = await asyncpg.connect(**kwargs)
                self._check_cluster(await self._conn.fetchval(_SYSTEM_ID_SQL))
                self.monitor.state.stats.incr("hang.monitor.connections")
            return [tuple(r) for r in await self._conn.fetch(sql)]

        return loop.run_until_complete(asyncio.wait_for(ask(), timeout))

    def _params(self) -> dict[str, Any]:
        """The engine's connect arguments for this address, the app's ``do_connect``
        listeners (token rotation) applied."""
        engine = self.monitor.engine_ref()
        if engine is None:
            raise RuntimeError("engine gone")
        dialect = engine.dialect
        cargs, cparams = dialect.create_connect_args(engine.url)
        args, params = list(cargs), dict(cparams)
        for listener in dialect.dispatch.do_connect:
            try:
                made = listener(dialect, None, args, params)
            except Exception:
                continue  # a listener that needs a connection record
            if made is not None:
                with contextlib.suppress(Exception):
                    made.close()
        params["host"], params["port"] = self.address
        return params

    def close(self) -> None:
        conn, self._conn = self._conn, None
        loop, self._loop = self._loop, None
        if conn is not None:
            with contextlib.suppress(Exception):
                if self._asyncpg:
                    conn.terminate()
                else:
                    conn.close()
        if loop is not None and not loop.is_running():
            _close_loop(loop)

    def forget(self) -> None:
        """After fork: drop the parent's connection without closing it (that would end it
        for the parent too); it stays referenced so that its finalizer never runs."""
        if self._conn is not None:
            _inherited.append(self._conn)
        self._conn = None
        self._loop = None


_inherited: list[Any] = []


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Close a prober's private event loop (stopped), after one last pass: asyncpg's
    ``terminate()`` and a connect given up on only schedule their transport's close. Without
    it the transport, its socket and the loop's self-pipe are left to the garbage collector
    (ResourceWarning). From inside a running event loop (an async engine's ``dispose()``)
    another loop cannot run in this thread: then in a short-lived thread of its own."""

    def finish() -> None:
        with contextlib.suppress(Exception):
            loop.run_until_complete(asyncio.sleep(0))
        loop.close()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        finish()
        return
    thread = threading.Thread(target=finish, name="dbresilience-hang-close", daemon=True)
    thread.start()
    thread.join(1.0)  # one pass of a loop with nothing to wait for: milliseconds


class _CannotJudge(Exception):
    """The server answered the probe, but the probe cannot tell anything."""


def _bounded(fn: Callable[[], Any], timeout: float) -> Any:
    """``fn()`` in a helper thread, waited for at most ``timeout`` seconds; a late result is
    closed when it arrives."""
    box: dict[str, Any] = {}
    done = threading.Event()
    gave_up = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc
        done.set()
        if gave_up.is_set() and "value" in box:
            with contextlib.suppress(Exception):
                box["value"].close()

    threading.Thread(target=run, name="dbresilience-hang-connect", daemon=True).start()
    if not done.wait(timeout):
        gave_up.set()
        if done.is_set() and "value" in box:  # finished between the wait and the flag
            return box["value"]
        raise TimeoutError(f"no connection within {timeout:g}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


@atexit.register
def _close_all() -> None:
    for monitor in list(_monitors):
        with contextlib.suppress(Exception):
            monitor.close()
