"""OpenTelemetry metrics of a resilient engine, under the current semantic-convention names.

Database client semantic conventions (the pool metrics are in development status; the old
``db.client.connections.*`` names are deprecated and not emitted):

==========================================  =====================  ==========================
name                                        instrument             attributes (besides pool)
==========================================  =====================  ==========================
``db.client.connection.count``              observable up-down     ``db.client.connection.
                                                                   state``: ``idle``/``used``
``db.client.connection.max``                observable up-down
``db.client.connection.idle.max``           observable up-down
``db.client.connection.idle.min``           observable up-down     (SQLAlchemy keeps none: 0)
``db.client.connection.pending_requests``   observable up-down
``db.client.connection.timeouts``           observable counter
``db.client.connection.create_time``        histogram, s
``db.client.connection.wait_time``          histogram, s
``db.client.connection.use_time``           histogram, s
``db.client.operation.duration`` (stable)   histogram, s           ``db.system.name``,
                                                                   ``db.namespace``,
                                                                   ``server.address``,
                                                                   ``server.port``,
                                                                   ``error.type``,
                                                                   ``db.response.status_code``
==========================================  =====================  ==========================

Every pool metric carries ``db.client.connection.pool.name``. Our own counters, read from
:func:`~dbresilience.get_stats` when the reader collects (nothing on the happy path), are
under ``dbresilience.``: ``retries`` (``dbresilience.retry.what``, ``dbresilience.cause``),
``replays``, ``disconnects``, ``invalidations`` (``dbresilience.scope``), ``connect.failures``,
``commit.outcomes`` (``dbresilience.commit.outcome``), ``breaker.opened``, ``breaker.state``
(gauge: 0 closed, 1 half-open, 2 open), ``hang.aborts`` (``dbresilience.reason``) and
``statement.timeouts``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from dbresilience._classification import classify
from dbresilience._engine_hooks import _sync_engine, get_stats, resilience_of
from dbresilience._exporters import pool_name as default_pool_name
from dbresilience._exporters._timings import attach, detach
from dbresilience._stats import EngineStats

__all__ = ["OpenTelemetryMetrics", "instrument_opentelemetry"]

#: Every timing an engine can export (see :func:`instrument_opentelemetry`).
ALL_TIMINGS = ("wait", "use", "create", "operation")

# The semantic conventions' advice for db.client.operation.duration (seconds).
_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
_BREAKER_LEVELS = {"closed": 0, "half-open": 1, "open": 2}


def _histogram(meter: metrics.Meter, name: str, description: str) -> metrics.Histogram:
    return meter.create_histogram(
        name, unit="s", description=description, explicit_bucket_boundaries_advisory=_BUCKETS
    )


class _Shared:
    """The instruments of one meter, made once and shared by every engine exported through it
    (the SDK hands back an instrument of the same name without its new callbacks: a second
    engine's observable instruments would report nothing)."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.engines: list[OpenTelemetryMetrics] = []
        self._lock = threading.Lock()
        self.create = _histogram(
            meter,
            "db.client.connection.create_time",
            "The time it took to create a new connection",
        )
        self.wait = _histogram(
            meter,
            "db.client.connection.wait_time",
            "The time it took to obtain an open connection from the pool",
        )
        self.use = _histogram(
            meter,
            "db.client.connection.use_time",
            "The time between borrowing a connection and returning it to the pool",
        )
        self.duration = _histogram(
            meter, "db.client.operation.duration", "Duration of database client operations"
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            [self._observe(lambda e, s: e.counts(s))],
            unit="{connection}",
            description="The number of connections that are currently in the state described "
            "by the state attribute",
        )
        for suffix, read in (
            ("max", lambda s: s.pool.max if s.pool.max >= 0 else None),
            ("idle.max", lambda s: s.pool.size),
            ("idle.min", lambda s: 0),
            ("pending_requests", lambda s: s.pool.waiting),
        ):
            meter.create_observable_up_down_counter(
                f"db.client.connection.{suffix}",
                [self._observe(_per_pool(read))],
                unit="{connection}",
            )
        meter.create_observable_counter(
            "db.client.connection.timeouts",
            [self._observe(_per_pool(lambda s: s.pool.timeouts))],
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to "
            "obtain a connection from the pool",
        )
        counters = {
            "dbresilience.retries": _retries,
            "dbresilience.replays": _per_pool(lambda s: s.replays),
            "dbresilience.disconnects": _per_pool(lambda s: s.disconnects),
            "dbresilience.invalidations": _by_prefix("invalidated.", "dbresilience.scope"),
            "dbresilience.connect.failures": _per_pool(lambda s: s.connect_failures),
            "dbresilience.commit.outcomes": _by_prefix(
                "commit.", "dbresilience.commit.outcome"
            ),
            "dbresilience.breaker.opened": _per_pool(lambda s: s.breaker_opened),
            "dbresilience.hang.aborts": _by_prefix("hang.aborted.", "dbresilience.reason"),
            "dbresilience.statement.timeouts": _per_pool(lambda s: s.statement_timeouts),
        }
        for name, reading in counters.items():
            meter.create_observable_counter(name, [self._observe(reading)])
        meter.create_observable_gauge(
            "dbresilience.breaker.state",
            [self._observe(_breaker)],
            description="0 closed, 1 half-open, 2 open",
        )

    def add(self, engine: OpenTelemetryMetrics) -> None:
        with self._lock:
            self.engines.append(engine)

    def remove(self, engine: OpenTelemetryMetrics) -> None:
        with self._lock:
            if engine in self.engines:
                self.engines.remove(engine)

    def _observe(self, read: Reading) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            found: list[Observation] = []
            with self._lock:
                engines = list(self.engines)
            for engine in engines:
                stats = engine.stats()
                if stats is None:  # the engine is gone
                    self.remove(engine)
                    continue
                found.extend(read(engine, stats))
            return found

        return callback


Reading = Callable[["OpenTelemetryMetrics", EngineStats], Sequence[Observation]]


def _per_pool(read: Callable[[EngineStats], float | None]) -> Reading:
    def observe(engine: OpenTelemetryMetrics, stats: EngineStats) -> Sequence[Observation]:
        value = read(stats)
        return [] if value is None else [Observation(value, engine.pool)]

    return observe


def _by_prefix(prefix: str, label: str) -> Reading:
    def observe(engine: OpenTelemetryMetrics, stats: EngineStats) -> Sequence[Observation]:
        return [
            Observation(n, {**engine.pool, label: key[len(prefix) :]})
            for key, n in stats.counters.items()
            if key.startswith(prefix) and "." not in key[len(prefix) :]
        ]

    return observe


def _retries(engine: OpenTelemetryMetrics, stats: EngineStats) -> Sequence[Observation]:
    found = []
    for key, n in stats.counters.items():
        parts = key.split(".")
        if parts[0] == "retry" and len(parts) == 3:
            labels = {**engine.pool, "dbresilience.retry.what": parts[1]}
            found.append(Observation(n, {**labels, "dbresilience.cause": parts[2]}))
    return found


def _breaker(engine: OpenTelemetryMetrics, stats: EngineStats) -> Sequence[Observation]:
    if stats.breaker is None:
        return []
    return [Observation(_BREAKER_LEVELS[stats.breaker], engine.pool)]


_shared: weakref.WeakKeyDictionary[Any, _Shared] = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def _shared_of(meter: metrics.Meter) -> _Shared:
    with _shared_lock:
        shared = _shared.get(meter)
        if shared is None:
            shared = _shared[meter] = _Shared(meter)
        return shared


class OpenTelemetryMetrics:
    """One engine's part of the instruments (returned by :func:`instrument_opentelemetry`);
    :meth:`close` stops exporting it."""

    def __init__(
        self,
        engine: Any,
        meter: metrics.Meter,
        name: str,
        timings: tuple[str, ...] = ALL_TIMINGS,
    ) -> None:
        self.timings = timings
        # The state, not the engine given: an execution_options() engine is a short-lived
        # proxy of the one the state belongs to.
        self._state = resilience_of(engine)
        root = self._state.engine_ref()
        assert root is not None
        url = root.url
        self.pool = {"db.client.connection.pool.name": name}
        self.idle = {**self.pool, "db.client.connection.state": "idle"}
        self.used = {**self.pool, "db.client.connection.state": "used"}
        operation: dict[str, Any] = {"db.system.name": "postgresql"}
        if url.database:
            operation["db.namespace"] = url.database
        address, _, port = default_pool_name(root).partition("/")[0].rpartition(":")
        operation["server.address"] = address
        if port.isdigit():
            operation["server.port"] = int(port)
        self._operation = operation
        self._shared = _shared_of(meter)
        self._shared.add(self)
        attach(self._state, root, self)

    def close(self) -> None:
        """Stop exporting this engine: no more timings, no more observations."""
        detach(self._state, self)
        self._shared.remove(self)

    def stats(self) -> EngineStats | None:
        """The engine's stats now; None once it is gone."""
        engine = self._state.engine_ref()
        return None if engine is None else get_stats(engine)

    def counts(self, stats: EngineStats) -> Sequence[Observation]:
        """``db.client.connection.count``: idle and used."""
        return [
            Observation(stats.pool.idle, self.idle),
            Observation(stats.pool.checked_out, self.used),
        ]

    # -- Recorder: called on the app's threads ----------------------------------------------

    def connection_created(self, seconds: float) -> None:
        self._shared.create.record(seconds, self.pool)

    def connection_waited(self, seconds: float) -> None:
        self._shared.wait.record(seconds, self.pool)

    def connection_used(self, seconds: float) -> None:
        self._shared.use.record(seconds, self.pool)

    def operation(self, seconds: float, error: BaseException | None) -> None:
        if error is None:
            self._shared.duration.record(seconds, self._operation)
            return
        sqlstate = classify(error).sqlstate
        attributes = dict(self._operation)
        if sqlstate is not None:
            attributes["db.response.status_code"] = sqlstate
        attributes["error.type"] = sqlstate or type(error).__qualname__
        self._shared.duration.record(seconds, attributes)


def instrument_opentelemetry(
    engine: Any,
    *,
    meter_provider: metrics.MeterProvider | None = None,
    pool_name: str | None = None,
    timings: Collection[str] = ALL_TIMINGS,
) -> OpenTelemetryMetrics:
    """Export ``engine``'s metrics through OpenTelemetry (``opentelemetry-api``; the
    application configures the SDK and its exporter).

    :param engine: a resilient ``Engine`` or ``AsyncEngine``.
    :param meter_provider: default: the global one (``metrics.get_meter_provider()``).
    :param pool_name: ``db.client.connection.pool.name``; default
        ``server.address:server.port/db.namespace`` from the URL (no user, no password).
    :param timings: the histograms recorded per operation: ``"wait"``
        (``db.client.connection.wait_time``), ``"use"`` (``.use_time``), ``"create"``
        (``.create_time``), ``"operation"`` (``db.client.operation.duration``); default all.
        Each costs one SDK ``record()`` per checkout or statement (several microseconds: see
        ``benchmarks/bench_instrumentation.py``); the other instruments are read when the
        reader collects and cost nothing per operation.
    """
    chosen = tuple(timings)
    unknown = set(chosen) - set(ALL_TIMINGS)
    if unknown:
        raise ValueError(f"timings: unknown {sorted(unknown)}; choose from {list(ALL_TIMINGS)}")
    sync_engine = _sync_engine(engine)
    resilience_of(sync_engine)  # ConfigurationError for a plain engine
    meter = metrics.get_meter("dbresilience", meter_provider=meter_provider)
    return OpenTelemetryMetrics(
        sync_engine, meter, pool_name or default_pool_name(sync_engine), chosen
    )
