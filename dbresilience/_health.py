"""Health checks for readiness probes: is the database usable through this engine, right now?

:func:`check_health` (sync engines) and :func:`check_health_async` (``AsyncEngine``) check out
a connection from the engine's own pool - the path a request takes - read the server version
and role, time one ``select 1`` round trip, and return a :class:`HealthReport`. They never
raise for an unreachable, stopped or black-holed server and return within ``timeout`` (plus a
few milliseconds): the report says ``reachable=False`` and why.

Bounding the wait:

* sync: the probe runs in a daemon thread and the caller stops waiting at ``timeout``. A probe
  that is still blocked (a black-holed network) keeps its thread until the driver gives up:
  for a resilient engine that is bounded by its :class:`~dbresilience.Policy` (connect retries
  stop after ``timeout``; an unanswered statement fails after ``tcp_user_timeout``, 30 s by
  default); for a plain engine it lasts as long as the driver waits. At most one probe per
  engine is in flight: a check made while one is still running waits for that probe instead
  of starting another, so repeated checks never pile up threads. The daemon thread never holds
  up interpreter exit.
* async: the probe runs in its own task, awaited with a timeout. On timeout the task is
  cancelled and the check returns at once; SQLAlchemy invalidates (never reuses) the
  connection that was mid-query, so the pool stays sound. Closing that connection may take
  SQLAlchemy up to 2 s more on a dead network; it finishes in the background, and meanwhile
  the connection counts as checked out.

A resilient engine's connect retries are limited to the timeout for the probe, so a refused or
starting-up server is reported with its real error rather than as a timeout.

FastAPI example - liveness must not touch the database (a database outage should not get the
process restarted); readiness takes the instance out of rotation while the database is down::

    from fastapi import FastAPI, Response
    from dbresilience import check_health_async, create_async_resilient_engine

    engine = create_async_resilient_engine("postgresql+asyncpg://app:secret@db/app")
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}  # liveness: the process is up; no database call

    @app.get("/readyz")
    async def readyz(response: Response) -> dict[str, object]:
        report = await check_health_async(engine, timeout=2.0)
        if not report.ready:  # not reachable, or the circuit breaker is open
            response.status_code = 503
        return report.to_dict()  # JSON-safe; never contains the password
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import Engine

from dbresilience._classification import classify
from dbresilience._commit_outcome import connect_budget
from dbresilience._engine_hooks import resilience_of
from dbresilience._errors import ConfigurationError
from dbresilience._redaction import redact
from dbresilience._stats import pool_stats

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["HealthReport", "PoolCounts", "check_health", "check_health_async"]

Role = Literal["primary", "standby"]

_INFO_SQL = text("select current_setting('server_version'), pg_is_in_recovery()")
_PING_SQL = text("select 1")
_BUDGET_SHARE = 0.8  # share of the timeout a resilient engine may spend retrying connects
_MAX_MESSAGE = 200  # characters of the driver's error message kept in HealthReport.error


@dataclass(frozen=True, slots=True)
class PoolCounts:
    """Connection counts of the engine's pool (``QueuePool`` methods; 0 for other pools).

    :ivar size: configured ``pool_size`` (``QueuePool.size()``).
    :ivar checked_in: idle connections in the pool (``checkedin()``).
    :ivar checked_out: connections in use (``checkedout()``).
    :ivar overflow: connections open beyond ``size`` (``overflow()``; SQLAlchemy's negative
        count of not-yet-opened slots is reported as 0).
    """

    size: int = 0
    checked_in: int = 0
    checked_out: int = 0
    overflow: int = 0


@dataclass(frozen=True, slots=True)
class HealthReport:
    """What a health check found.

    :ivar reachable: a connection was checked out and answered ``select 1`` in time.
    :ivar latency: round trip of ``select 1`` in seconds (not counting the checkout).
    :ivar server_version: ``server_version`` setting, e.g. ``"16.4"``.
    :ivar role: ``"standby"`` when ``pg_is_in_recovery()``, else ``"primary"``.
    :ivar pool: the pool's counts after the check.
    :ivar breaker: the engine's circuit-breaker state (``"closed"``, ``"open"``,
        ``"half-open"``); ``None`` for a plain engine or one without a breaker.
    :ivar error: when unreachable: ``"<kind>: <message>"`` with the kind from
        :func:`~dbresilience.classify` (or ``timeout``), password-free.
    """

    reachable: bool
    latency: float | None = None
    server_version: str | None = None
    role: Role | None = None
    pool: PoolCounts = field(default_factory=PoolCounts)
    breaker: str | None = None
    error: str | None = None

    @property
    def ready(self) -> bool:
        """Reachable and the circuit breaker is not open: fit to receive traffic."""
        return self.reachable and self.breaker != "open"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field, plus ``ready``."""
        out = asdict(self)
        out["ready"] = self.ready
        return out


@dataclass(frozen=True, slots=True)
class _Probe:
    latency: float | None = None
    server_version: str | None = None
    role: Role | None = None
    error: str | None = None


class _Phase:
    """Where a probe is, for the message of a timeout."""

    __slots__ = ("name",)

    def __init__(self) -> None:
        self.name = "checkout"

    def timeout_error(self, timeout: float) -> str:
        if self.name == "checkout":
            what = "no connection (server unreachable or pool exhausted)"
        else:
            what = "no answer from the server"
        return f"timeout: {what} within {timeout:g} s"


def _check_timeout(timeout: float) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, got {timeout!r}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")


def _describe(exc: BaseException) -> str:
    """``"<kind>: <first line of the driver's message>"``, redacted and shortened."""
    kind = classify(exc).kind.value
    source: BaseException = exc
    if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None:
        source = exc.orig
    lines = [line.strip() for line in str(source).splitlines() if line.strip()]
    message = lines[0] if lines else type(source).__name__
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    return f"{kind}: {redact(message)}"


def _role(in_recovery: object) -> Role:
    return "standby" if in_recovery else "primary"


def _pool_counts(engine: Engine) -> PoolCounts:
    now = pool_stats(engine.pool)
    return PoolCounts(
        size=now.size, checked_in=now.idle, checked_out=now.checked_out, overflow=now.overflow
    )


def _breaker_state(engine: Engine | AsyncEngine) -> str | None:
    try:
        state = resilience_of(engine)
    except ConfigurationError:  # a plain engine
        return None
    breaker = getattr(state, "breaker", None)
    if breaker is None:
        return None
    value = getattr(breaker, "state", None)
    if value is None:
        return None
    return str(getattr(value, "value", value))  # a str, or an enum of str


def _report(engine: Engine, probe: _Probe, breaker: str | None) -> HealthReport:
    reachable = probe.error is None
    return HealthReport(
        reachable=reachable,
        latency=probe.latency if reachable else None,
        server_version=probe.server_version if reachable else None,
        role=probe.role if reachable else None,
        pool=_pool_counts(engine),
        breaker=breaker,
        error=probe.error,
    )


# -- sync ------------------------------------------------------------------------------------

_inflight: weakref.WeakKeyDictionary[Engine, tuple[Future[_Probe], _Phase]] = (
    weakref.WeakKeyDictionary()
)
_inflight_lock = threading.Lock()


def _probe_sync(engine: Engine, phase: _Phase, budget: float) -> _Probe:
    token = connect_budget.set(budget)
    try:
        with engine.connect() as conn:
            phase.name = "query"
            version, in_recovery = conn.execute(_INFO_SQL).one()
            started = time.perf_counter()
            conn.execute(_PING_SQL).scalar_one()
            latency = time.perf_counter() - started
        return _Probe(latency, str(version), _role(in_recovery))
    except Exception as exc:
        return _Probe(error=_describe(exc))
    finally:
        connect_budget.reset(token)


def _run_probe(engine: Engine, future: Future[_Probe], phase: _Phase, budget: float) -> None:
    try:
        future.set_result(_probe_sync(engine, phase, budget))  # never raises an Exception
    finally:
        with _inflight_lock:
            entry = _inflight.get(engine)
            if entry is not None and entry[0] is future:
                del _inflight[engine]


def check_health(engine: Engine, *, timeout: float = 2.0) -> HealthReport:
    """Check ``engine``'s database through its pool; return within ``timeout`` seconds.

    :param engine: a sync :class:`~sqlalchemy.engine.Engine`, resilient or plain (for an
        ``AsyncEngine`` use :func:`check_health_async`).
    :param timeout: seconds to wait for a connection and the answers. Default 2 s.

    Never raises for database failures; ``ValueError``/``TypeError`` only for bad arguments.
    """
    _check_timeout(timeout)
    if not isinstance(engine, Engine):
        hint = " (use check_health_async)" if hasattr(engine, "sync_engine") else ""
        raise TypeError(f"check_health() needs a sync Engine, got {type(engine).__name__}{hint}")
    with _inflight_lock:
        entry = _inflight.get(engine)
        if entry is None:
            entry = (Future(), _Phase())
            _inflight[engine] = entry
            threading.Thread(
                target=_run_probe,
                args=(engine, *entry, timeout * _BUDGET_SHARE),
                name="dbresilience-health",
                daemon=True,
            ).start()
    future, phase = entry
    try:
        probe = future.result(timeout=timeout)
    except FutureTimeout:
        probe = _Probe(error=phase.timeout_error(timeout))
    return _report(engine, probe, _breaker_state(engine))


# -- async -----------------------------------------------------------------------------------


_cancelled: set[asyncio.Task[_Probe]] = set()  # strong references until they finish


async def _probe_async(engine: AsyncEngine, phase: _Phase, budget: float) -> _Probe:
    token = connect_budget.set(budget)
    try:
        async with engine.connect() as conn:
            phase.name = "query"
            version, in_recovery = (await conn.execute(_INFO_SQL)).one()
            started = time.perf_counter()
            (await conn.execute(_PING_SQL)).scalar_one()
            latency = time.perf_counter() - started
        return _Probe(latency, str(version), _role(in_recovery))
    except Exception as exc:
        return _Probe(error=_describe(exc))
    finally:
        connect_budget.reset(token)


async def check_health_async(async_engine: AsyncEngine, *, timeout: float = 2.0) -> HealthReport:
    """Check an ``AsyncEngine``'s database through its pool; return within ``timeout`` seconds.

    :param async_engine: a :class:`~sqlalchemy.ext.asyncio.AsyncEngine`, resilient or plain.
    :param timeout: seconds to wait for a connection and the answers. Default 2 s.

    Never raises for database failures; cancelling the calling task cancels the check too.
    """
    _check_timeout(timeout)
    sync_engine = getattr(async_engine, "sync_engine", None)
    if not isinstance(sync_engine, Engine):
        raise TypeError(
            f"check_health_async() needs an AsyncEngine, got {type(async_engine).__name__}"
        )
    phase = _Phase()
    task = asyncio.ensure_future(_probe_async(async_engine, phase, timeout * _BUDGET_SHARE))
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except BaseException:  # the caller was cancelled
        task.cancel()
        raise
    if task in done:
        probe = task.result()
    else:
        # Like asyncio.wait_for, minus waiting for the cancelled probe to clean up: SQLAlchemy
        # invalidates the connection that was mid-query and closes it gracefully, which takes
        # up to 2 s on a dead network. That finishes in the background.
        task.cancel()
        _cancelled.add(task)
        task.add_done_callback(_cancelled.discard)
        probe = _Probe(error=phase.timeout_error(timeout))
    return _report(sync_engine, probe, _breaker_state(async_engine))
