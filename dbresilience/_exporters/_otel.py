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

import weakref
from collections.abc import Collection, Iterable, Sequence
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
_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
_BREAKER_LEVELS = {"closed": 0, "half-open": 1, "open": 2}


def _histogram(meter: metrics.Meter, name: str, description: str) -> metrics.Histogram:
    try:
        return meter.create_histogram(
            name,
            unit="s",
            description=description,
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
    except TypeError:  # opentelemetry-api before 1.23: no advice
        return meter.create_histogram(name, unit="s", description=description)


class OpenTelemetryMetrics:
    """The instruments of one engine (returned by :func:`instrument_opentelemetry`);
    :meth:`close` stops recording its timings."""

    def __init__(
        self, engine: Any, meter: metrics.Meter, name: str, timings: tuple[str, ...] = ALL_TIMINGS
    ) -> None:
        self.timings = timings
        sync_engine = _sync_engine(engine)
        self._state = resilience_of(sync_engine)
        self._engine = weakref.ref(sync_engine)
        url = sync_engine.url
        pool = {"db.client.connection.pool.name": name}
        self._pool = pool
        self._idle = {**pool, "db.client.connection.state": "idle"}
        self._used = {**pool, "db.client.connection.state": "used"}
        operation: dict[str, Any] = {"db.system.name": "postgresql"}
        if url.database:
            operation["db.namespace"] = url.database
        address, _, port = name.partition("/")[0].rpartition(":")
        operation["server.address"] = address
        if port.isdigit():
            operation["server.port"] = int(port)
        self._operation = operation
        self._create = _histogram(
            meter,
            "db.client.connection.create_time",
            "The time it took to create a new connection",
        )
        self._wait = _histogram(
            meter,
            "db.client.connection.wait_time",
            "The time it took to obtain an open connection from the pool",
        )
        self._use = _histogram(
            meter,
            "db.client.connection.use_time",
            "The time between borrowing a connection and returning it to the pool",
        )
        self._duration = _histogram(
            meter, "db.client.operation.duration", "Duration of database client operations"
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            [self._count],
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
                f"db.client.connection.{suffix}", [self._pool_gauge(read)], unit="{connection}"
            )
        meter.create_observable_counter(
            "db.client.connection.timeouts",
            [self._pool_gauge(lambda s: s.pool.timeouts)],
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to "
            "obtain a connection from the pool",
        )
        self._own_counters(meter)
        attach(self._state, sync_engine, self)

    def close(self) -> None:
        """Stop recording this engine's timings (observable instruments report nothing more
        once the engine is gone)."""
        detach(self._state, self)

    # -- Recorder: called on the app's threads ----------------------------------------------

    def connection_created(self, seconds: float) -> None:
        self._create.record(seconds, self._pool)

    def connection_waited(self, seconds: float) -> None:
        self._wait.record(seconds, self._pool)

    def connection_used(self, seconds: float) -> None:
        self._use.record(seconds, self._pool)

    def operation(self, seconds: float, error: BaseException | None) -> None:
        if error is None:
            self._duration.record(seconds, self._operation)
            return
        sqlstate = classify(error).sqlstate
        attributes = dict(self._operation)
        if sqlstate is not None:
            attributes["db.response.status_code"] = sqlstate
        attributes["error.type"] = sqlstate or type(error).__qualname__
        self._duration.record(seconds, attributes)

    # -- observable instruments: read when the reader collects --------------------------------

    def _stats(self) -> EngineStats | None:
        engine = self._engine()
        return None if engine is None else get_stats(engine)

    def _count(self, options: CallbackOptions) -> Iterable[Observation]:
        stats = self._stats()
        if stats is None:
            return []
        return [
            Observation(stats.pool.idle, self._idle),
            Observation(stats.pool.checked_out, self._used),
        ]

    def _pool_gauge(self, read: Any) -> Any:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            stats = self._stats()
            value = None if stats is None else read(stats)
            return [] if value is None else [Observation(value, self._pool)]

        return callback

    def _own_counters(self, meter: metrics.Meter) -> None:
        pool = self._pool

        def by_prefix(prefix: str, label: str) -> Any:
            def read(stats: EngineStats) -> Sequence[Observation]:
                return [
                    Observation(n, {**pool, label: key[len(prefix) :]})
                    for key, n in stats.counters.items()
                    if key.startswith(prefix) and "." not in key[len(prefix) :]
                ]

            return read

        def retries(stats: EngineStats) -> Sequence[Observation]:
            found = []
            for key, n in stats.counters.items():
                parts = key.split(".")
                if parts[0] == "retry" and len(parts) == 3:
                    labels = {**pool, "dbresilience.retry.what": parts[1]}
                    found.append(Observation(n, {**labels, "dbresilience.cause": parts[2]}))
            return found

        def single(read: Any) -> Any:
            return lambda stats: [Observation(read(stats), pool)]

        counters = {
            "dbresilience.retries": retries,
            "dbresilience.replays": single(lambda s: s.replays),
            "dbresilience.disconnects": single(lambda s: s.disconnects),
            "dbresilience.invalidations": by_prefix("invalidated.", "dbresilience.scope"),
            "dbresilience.connect.failures": single(lambda s: s.connect_failures),
            "dbresilience.commit.outcomes": by_prefix("commit.", "dbresilience.commit.outcome"),
            "dbresilience.breaker.opened": single(lambda s: s.breaker_opened),
            "dbresilience.hang.aborts": by_prefix("hang.aborted.", "dbresilience.reason"),
            "dbresilience.statement.timeouts": single(lambda s: s.statement_timeouts),
        }
        for name, read in counters.items():
            meter.create_observable_counter(name, [self._reading(read)])

        def breaker(stats: EngineStats) -> Sequence[Observation]:
            if stats.breaker is None:
                return []
            return [Observation(_BREAKER_LEVELS[stats.breaker], pool)]

        meter.create_observable_gauge(
            "dbresilience.breaker.state",
            [self._reading(breaker)],
            description="0 closed, 1 half-open, 2 open",
        )

    def _reading(self, read: Any) -> Any:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            stats = self._stats()
            return [] if stats is None else list(read(stats))

        return callback


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
    from dbresilience import __name__ as package

    meter = metrics.get_meter(package, meter_provider=meter_provider)
    return OpenTelemetryMetrics(
        sync_engine, meter, pool_name or default_pool_name(sync_engine), chosen
    )
