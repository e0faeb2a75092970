"""A Prometheus collector for resilient engines: ``dbresilience_*`` series.

Read when Prometheus scrapes (from :func:`~dbresilience.get_stats`), except the acquire-time
histogram, recorded at each checkout. Every series has the label ``engine`` (the pool name:
``host:port/database``, never a user or password); a few have one more, from small fixed
sets:

=========================================  =========  ======================================
series                                     type       extra labels
=========================================  =========  ======================================
``dbresilience_pool_connections``          gauge      ``state``: ``idle`` | ``used``
``dbresilience_pool_max_connections``      gauge      (absent when the pool has no limit)
``dbresilience_pool_overflow``             gauge
``dbresilience_pool_pending_requests``     gauge
``dbresilience_pool_timeouts_total``       counter
``dbresilience_pool_acquire_seconds``      histogram
``dbresilience_retries_total``             counter    ``what``, ``cause``
``dbresilience_replays_total``             counter
``dbresilience_disconnects_total``         counter
``dbresilience_invalidations_total``       counter    ``scope``: ``connection`` | ``pool``
``dbresilience_connect_failures_total``    counter
``dbresilience_errors_total``              counter    ``kind`` (the error taxonomy)
``dbresilience_commit_outcomes_total``     counter    ``outcome``
``dbresilience_breaker_state``             gauge      ``state`` (1 for the current one)
``dbresilience_breaker_opened_total``      counter
``dbresilience_hang_aborts_total``         counter    ``reason``
``dbresilience_statement_timeouts_total``  counter
=========================================  =========  ======================================
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from dbresilience._engine_hooks import _sync_engine, get_stats, resilience_of
from dbresilience._exporters import pool_name as default_pool_name
from dbresilience._exporters._timings import attach, detach
from dbresilience._stats import EngineStats

__all__ = ["PrometheusCollector", "register_prometheus"]

#: Upper bounds of the acquire-time histogram (seconds).
ACQUIRE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0
)


class _Histogram:
    """Thread-safe fixed-bucket histogram (cumulative counts are computed at scrape time)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        buckets, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
            running += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return buckets, total


class PrometheusCollector:
    """One engine's ``dbresilience_*`` series (see :func:`register_prometheus`); the
    registry's :class:`_RegistryCollector` puts every engine's samples in one family each."""

    timings: tuple[str, ...] = ("wait",)  # the acquire-time histogram only

    def __init__(self, engine: Any, name: str) -> None:
        # The state, not the engine given: an execution_options() engine is a short-lived
        # proxy of the one the state belongs to.
        self._state = resilience_of(engine)
        self.name = name
        self._acquire = _Histogram(ACQUIRE_BUCKETS)
        self._registry: _RegistryCollector | None = None
        root = self._state.engine_ref()
        assert root is not None
        attach(self._state, root, self)

    # -- Recorder ---------------------------------------------------------------------------

    def connection_waited(self, seconds: float) -> None:
        self._acquire.observe(seconds)

    def connection_created(self, seconds: float) -> None:
        return None

    def connection_used(self, seconds: float) -> None:
        return None

    def operation(self, seconds: float, error: BaseException | None) -> None:
        return None

    # -- series ---------------------------------------------------------------------------------

    def families(self) -> list[Metric] | None:
        """This engine's families; None once the engine is gone."""
        engine = self._state.engine_ref()
        if engine is None:
            return None
        stats = get_stats(engine)
        found = list(_pool_series(self.name, stats))
        buckets, total = self._acquire.cumulative()
        acquire = HistogramMetricFamily(
            "dbresilience_pool_acquire_seconds",
            "Time to get a connection from the pool (waiting for one, or making one)",
            labels=["engine"],
        )
        acquire.add_metric([self.name], buckets, total)
        found.append(acquire)
        found.extend(_event_series(self.name, stats))
        return found

    def unregister(self) -> None:
        """Stop exporting this engine (its series leave the registry's scrape)."""
        if self._registry is not None:
            self._registry.remove(self)
            self._registry = None
        detach(self._state, self)


class _RegistryCollector:
    """What a registry scrapes: every registered engine's samples, one family per name (two
    collectors each yielding the same family would make the exposition invalid)."""

    def __init__(self) -> None:
        self.engines: dict[str, PrometheusCollector] = {}
        self._lock = threading.Lock()

    def add(self, collector: PrometheusCollector) -> None:
        with self._lock:
            if collector.name in self.engines:
                raise ValueError(
                    f"an engine named {collector.name!r} is already exported to this registry: "
                    "give this one another name (register_prometheus(engine, name=...))"
                )
            self.engines[collector.name] = collector

    def remove(self, collector: PrometheusCollector) -> None:
        with self._lock:
            if self.engines.get(collector.name) is collector:
                del self.engines[collector.name]

    def describe(self) -> list[Metric]:
        """Nothing up front: the names depend on the engines registered by then."""
        return []

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            collectors = list(self.engines.values())
        merged: dict[str, Metric] = {}
        for collector in collectors:
            families = collector.families()
            if families is None:  # the engine is gone
                self.remove(collector)
                continue
            for family in families:
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    merged[family.name] = family
        yield from merged.values()


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _RegistryCollector] = (
    weakref.WeakKeyDictionary()
)
_by_registry_lock = threading.Lock()


def _gauge(name: str, doc: str, engine: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["engine"])
    family.add_metric([engine], value)
    return family


def _counter(name: str, doc: str, engine: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["engine"])
    family.add_metric([engine], value)
    return family


def _pool_series(engine: str, stats: EngineStats) -> Iterator[Metric]:
    pool = stats.pool
    connections = GaugeMetricFamily(
        "dbresilience_pool_connections", "Open connections by state", labels=["engine", "state"]
    )
    connections.add_metric([engine, "idle"], pool.idle)
    connections.add_metric([engine, "used"], pool.checked_out)
    yield connections
    if pool.max >= 0:
        yield _gauge(
            "dbresilience_pool_max_connections", "pool_size + max_overflow", engine, pool.max
        )
    yield _gauge(
        "dbresilience_pool_overflow", "Connections beyond pool_size", engine, pool.overflow
    )
    yield _gauge(
        "dbresilience_pool_pending_requests", "Checkouts in progress", engine, pool.waiting
    )
    yield _counter(
        "dbresilience_pool_timeouts", "Checkouts that hit pool_timeout", engine, pool.timeouts
    )


def _labelled(
    name: str, doc: str, engine: str, labels: list[str], rows: list[tuple[list[str], int]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["engine", *labels])
    for values, n in rows:
        family.add_metric([engine, *values], n)
    return family


def _suffixes(stats: EngineStats, prefix: str) -> list[tuple[list[str], int]]:
    return [
        ([key[len(prefix) :]], n)
        for key, n in sorted(stats.counters.items())
        if key.startswith(prefix) and "." not in key[len(prefix) :]
    ]


def _event_series(engine: str, stats: EngineStats) -> Iterator[Metric]:
    retries = [
        (parts[1:], n)
        for key, n in sorted(stats.counters.items())
        if (parts := key.split("."))[0] == "retry" and len(parts) == 3
    ]
    yield _labelled(
        "dbresilience_retries", "Retries by what and cause", engine, ["what", "cause"], retries
    )
    yield _counter("dbresilience_replays", "First statements replayed", engine, stats.replays)
    yield _counter(
        "dbresilience_disconnects", "Connections found lost", engine, stats.disconnects
    )
    yield _labelled(
        "dbresilience_invalidations",
        "Connections or whole pools invalidated",
        engine,
        ["scope"],
        _suffixes(stats, "invalidated."),
    )
    yield _counter(
        "dbresilience_connect_failures",
        "Connect attempts that failed",
        engine,
        stats.connect_failures,
    )
    yield _labelled(
        "dbresilience_errors", "Errors by kind", engine, ["kind"], _suffixes(stats, "error.")
    )
    yield _labelled(
        "dbresilience_commit_outcomes",
        "Lost COMMITs by resolved outcome",
        engine,
        ["outcome"],
        _suffixes(stats, "commit."),
    )
    state = GaugeMetricFamily(
        "dbresilience_breaker_state",
        "Circuit breaker state (1 for the current one)",
        labels=["engine", "state"],
    )
    if stats.breaker is not None:
        for name in ("closed", "half-open", "open"):
            state.add_metric([engine, name], 1.0 if stats.breaker == name else 0.0)
    yield state
    yield _counter(
        "dbresilience_breaker_opened", "Times the breaker opened", engine, stats.breaker_opened
    )
    yield _labelled(
        "dbresilience_hang_aborts",
        "Calls aborted by the hang monitor",
        engine,
        ["reason"],
        _suffixes(stats, "hang.aborted."),
    )
    yield _counter(
        "dbresilience_statement_timeouts",
        "Statements cut off at their deadline",
        engine,
        stats.statement_timeouts,
    )


def register_prometheus(
    engine: Any, *, registry: CollectorRegistry | None = None, name: str | None = None
) -> PrometheusCollector:
    """Register a :class:`PrometheusCollector` of ``engine`` (``prometheus-client``).

    :param engine: a resilient ``Engine`` or ``AsyncEngine``.
    :param registry: default: ``prometheus_client.REGISTRY``.
    :param name: the ``engine`` label; default ``host:port/database`` from the URL.
        Unique per registry (:class:`ValueError` otherwise): two engines on one database
        (a writer and a reporting pool) need names of their own.
    """
    sync_engine = _sync_engine(engine)
    collector = PrometheusCollector(sync_engine, name or default_pool_name(sync_engine))
    target = REGISTRY if registry is None else registry
    with _by_registry_lock:
        shared = _by_registry.get(target)
        if shared is None:
            shared = _by_registry[target] = _RegistryCollector()
            target.register(shared)
    try:
        shared.add(collector)
    except ValueError:
        collector.unregister()  # detach its timings
        raise
    collector._registry = shared
    return collector
