"""New connections: network defaults, connect retries with backoff, the circuit breaker.

* ``do_connect`` (event) - network defaults (timeouts, keepalives; for asyncpg set on the
  socket). It returns nothing, so the application's own ``do_connect`` listeners (token
  rotation) still run, and run again on every attempt.
* ``do_connect`` also puts last, in a multi-host URL, the hosts that answered a write with
  25006 while in recovery (a standby, a demoted primary listed first) and those the hang
  monitor found hung: libpq and asyncpg take the first host that accepts the connection, so
  without it every new connection would land there again.
* the pool's creator (wrapped) - connect retries with backoff through tenacity, bounded by
  :attr:`Policy.connect_deadline` (or a commit check's budget), behind the circuit breaker
  (commit checks bypass it). Engines made with ``creator=`` / ``async_creator=`` get the same;
  their sockets are tuned after connecting, and one warning says that their connect attempts
  are only as bounded as the creator makes them.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import tenacity
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.engine.interfaces import DBAPIConnection, Dialect
from sqlalchemy.pool import ConnectionPoolEntry, Pool

from dbresilience import _sqla
from dbresilience._circuit_breaker import BreakerState, CircuitBreaker
from dbresilience._classification import Classification, ErrorKind, classify
from dbresilience._commit_outcome import connect_budget
from dbresilience._drivers import tune_socket
from dbresilience._errors import CircuitOpen, error_from, make_error
from dbresilience._events import BreakerTransition, ConnectFailure
from dbresilience._hooks._state import EngineResilience
from dbresilience._observability import logger
from dbresilience._retrying import retry_kwargs
from dbresilience._watchdog import watchdog

__all__ = ["Connector", "try_hosts_last"]

_CONNECT_RETRY_KINDS = frozenset(
    {ErrorKind.UNAVAILABLE, ErrorKind.RESOURCE_EXHAUSTED, ErrorKind.DISCONNECT}
)
# Failures that say "the server cannot be reached": the only ones the circuit breaker counts.
_CONNECTIVITY_KINDS = frozenset({ErrorKind.UNAVAILABLE, ErrorKind.DISCONNECT})


def _connect_retryable(exc: BaseException) -> bool:
    return not isinstance(exc, CircuitOpen) and classify(exc).kind in _CONNECT_RETRY_KINDS


def try_hosts_last(cparams: dict[str, Any], last: Mapping[tuple[str, int], float]) -> bool:
    """Reorder a multi-host ``cparams`` (libpq's ``host``/``port`` lists as strings, or
    asyncpg's lists) so that the addresses in ``last`` come after the others, in the order of
    their values (the smallest first); the others keep their order. True if anything moved.
    """
    host, port = cparams.get("host"), cparams.get("port")
    as_text = isinstance(host, str)
    hosts = host.split(",") if isinstance(host, str) else list(host or [])
    if len(hosts) < 2:
        return False
    ports_in = port.split(",") if isinstance(port, str) else port
    ports = list(ports_in) if isinstance(ports_in, (list, tuple)) else [port] * len(hosts)
    if len(ports) == 1:
        ports = ports * len(hosts)
    if len(ports) != len(hosts):
        return False
    pairs = list(zip(hosts, ports, strict=True))

    def rank(pair: tuple[Any, Any]) -> float:
        try:
            return last.get((str(pair[0]), int(pair[1] or 5432)), -math.inf)
        except ValueError:
            return -math.inf

    ordered = sorted(pairs, key=rank)  # stable: the others keep their order
    if ordered == pairs:
        return False
    if as_text:
        cparams["host"] = ",".join(str(h) for h, _ in ordered)
        cparams["port"] = ",".join(str(p) for _, p in ordered)
    else:
        cparams["host"] = [h for h, _ in ordered]
        cparams["port"] = [p for _, p in ordered]
    return True


class Connector:
    """Makes every new connection of one engine (pool checkouts and commit checks)."""

    def __init__(self, state: EngineResilience) -> None:
        self.state = state
        self._do_connect_runs = 0  # how often on_do_connect ran (creator= bypasses it)
        self._warned_creator = False

    def install(self, engine: Engine) -> None:
        """Listen to ``do_connect`` (first, before the app's listeners)."""
        event.listen(engine, "do_connect", self.on_do_connect, insert=True)

    def on_do_connect(
        self, dialect: Dialect, conn_rec: ConnectionPoolEntry, cargs: Any, cparams: dict[str, Any]
    ) -> None:
        """``do_connect`` listener: network defaults only. Returns None, so the app's own
        ``do_connect`` listeners run after it (and may override what it set)."""
        self._do_connect_runs += 1
        state = self.state
        state.driver.apply_network_defaults(cparams, state.policy, budget=connect_budget.get())
        if state.in_recovery_at and try_hosts_last(cparams, dict(state.in_recovery_at)):
            state.stats.incr("recovery.hosts-reordered")
        monitor = state.monitor
        if monitor is not None and monitor.hung:
            from dbresilience._hooks.hangs import try_hung_hosts_last

            if try_hung_hosts_last(cparams, monitor.hung_addresses()):
                state.stats.incr("hang.hosts-reordered")

    def hook_creator(self, pool: Pool) -> None:
        """Wrap ``pool``'s creator (SQLAlchemy's, which runs the ``do_connect`` listeners, or
        the app's ``creator=``): every new connection goes through :meth:`connect`."""
        if getattr(_sqla.pool_creator(pool), "_dbresilience_connector", None) is self:
            return  # pool.recreate() hands our wrapper over
        invoke = _sqla.invoke_creator(pool)

        def creator(connection_record: ConnectionPoolEntry | None = None) -> DBAPIConnection:
            return self.connect(invoke, connection_record)

        creator._dbresilience_connector = self  # type: ignore[attr-defined]
        _sqla.set_pool_creator(pool, creator)

    def connect(
        self, invoke: Callable[[Any], DBAPIConnection], record: ConnectionPoolEntry | None
    ) -> DBAPIConnection:
        """A new connection: retried with backoff within the connect deadline (or the commit
        check's budget), through the circuit breaker (except for commit checks)."""
        state = self.state
        budget = connect_budget.get()  # set while a commit check connects
        breaker = state.breaker if budget is None else None
        if breaker is not None and breaker.rejecting():
            raise self._circuit_open(breaker)  # before building any retry machinery
        policy = state.policy
        deadline = policy.connect_deadline
        if budget is not None:
            deadline = min(budget, deadline)
        retrying = tenacity.Retrying(
            sleep=state.sleep,
            **retry_kwargs(
                "connect",
                attempts=1_000_000,  # bounded by the deadline
                deadline=deadline,
                wait_initial=policy.connect_wait_initial,
                wait_max=policy.connect_wait_max,
                stats=state.stats,
                retry_if=_connect_retryable,
            ),
        )
        runs = self._do_connect_runs
        started = time.monotonic()
        try:
            connection: DBAPIConnection = retrying(self._connect_once, invoke, record, breaker)
        except Exception as exc:
            if isinstance(exc, (sa_exc.SQLAlchemyError, self._dbapi_error)):
                raise  # SQLAlchemy wraps driver errors and the handle_error hook classifies
            error = self._connect_error(exc)
            if error is exc:  # the app's own (its creator's): unchanged
                raise
            raise error from exc
        except BaseException as exc:
            # Cancelled mid-connect: the driver's half-made connection lives in the finished
            # frames of this traceback, which tenacity's retry state keeps in a reference cycle;
            # clear them so it is closed now, not at the next full garbage collection.
            traceback.clear_frames(exc.__traceback__)
            raise
        if self._do_connect_runs == runs:  # made by the app's creator=, not from the URL
            self._made_by_creator(connection)
        state.driver.configure(connection, policy)
        if state.call_bound:
            watchdog.ensure_alive()
        creates = state.recorders.get("create") if state.recorders else None
        if creates and budget is None:  # a commit check's connection is not the pool's
            took = time.monotonic() - started
            for recorder in creates:
                recorder.connection_created(took)
        return connection

    @property
    def _dbapi_error(self) -> type[Exception]:
        engine = self.state.engine_ref()
        dbapi = None if engine is None else engine.dialect.loaded_dbapi
        error: type[Exception] = getattr(dbapi, "Error", Exception)
        return error

    def _made_by_creator(self, connection: Any) -> None:
        """Tune a connection the app's ``creator=`` made: keepalives and TCP_USER_TIMEOUT on
        its socket; a connect timeout cannot be given after the fact: say so, once."""
        state = self.state
        with contextlib.suppress(Exception):
            fd = state.driver.fileno(connection)
            with socket.socket(fileno=os.dup(fd)) as sock:
                tune_socket(sock, state.policy)
        if not self._warned_creator:
            self._warned_creator = True
            logger.warning(
                "engine %s connects through creator=: dbresilience retries its connects and "
                "bounds its statements, but cannot bound a connect attempt itself: pass a "
                "connect timeout to the driver in your creator",
                state.name,
            )

    def _connect_once(
        self,
        invoke: Callable[[Any], DBAPIConnection],
        record: ConnectionPoolEntry | None,
        breaker: CircuitBreaker | None,
    ) -> DBAPIConnection:
        """One connect attempt (running the app's ``do_connect`` listeners), through the
        circuit breaker."""
        stats = self.state.stats
        if breaker is None:
            try:
                return invoke(record)
            except Exception as exc:
                stats.emit(ConnectFailure(self.state.name, classify(exc)))
                raise
        probes = breaker.probes
        if not breaker.allow():
            raise self._circuit_open(breaker)
        if breaker.probes != probes:  # this caller took the probe slot of an open breaker
            self._transition("open", "half-open")
        try:
            connection: DBAPIConnection = invoke(record)
        except Exception as exc:
            found = classify(exc)
            stats.emit(ConnectFailure(self.state.name, found))
            if found.kind not in _CONNECTIVITY_KINDS:
                # reached the server (e.g. auth failed): not down
                if breaker.record_success():
                    self._transition("half-open", "closed")
            elif breaker.record_failure():
                self._transition("closed", "open")
            raise
        except BaseException:
            breaker.abandon()  # cancelled: let another caller probe
            raise
        if breaker.record_success():
            self._transition("half-open", "closed")
        return connection

    def _transition(self, old: BreakerState, new: BreakerState) -> None:
        self.state.stats.emit(BreakerTransition(self.state.name, old, new))

    def _circuit_open(self, breaker: CircuitBreaker) -> Exception:
        wait = breaker.retry_after()
        error = make_error(
            CircuitOpen,
            f"circuit breaker open: failing fast without connecting to {self.state.name}; "
            f"next probe in {wait:.1f}s",
            Classification(ErrorKind.UNAVAILABLE, None, "circuit open"),
        )
        error.retry_after = wait  # type: ignore[attr-defined]
        self.state.stats.incr("breaker.fail_fast")
        return error

    def _connect_error(self, exc: Exception) -> Exception:
        """What to raise for a non-DBAPI connect failure (asyncpg: bare ``OSError``...)."""
        found = classify(exc)
        if found.kind is ErrorKind.APPLICATION:
            return exc
        if found.kind is ErrorKind.DISCONNECT:  # lost while connecting: could not connect
            found = Classification(ErrorKind.UNAVAILABLE, found.sqlstate, found.reason)
        self.state.stats.incr(f"error.{found.kind.value}")
        return error_from(exc, found)
