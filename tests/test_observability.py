"""What operators see, under real faults: get_stats(), the event hooks, a Prometheus scrape, an
in-memory OpenTelemetry reader and the log, for a backend kill, a restart and a circuit breaker
that opens and closes - the same numbers everywhere, and never the password."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from _support import SCRAM_ROLE, SCRAM_SECRET, scram_cluster
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.exc import ProgrammingError

import dbresilience
from dbresilience import (
    BreakerTransition,
    CircuitOpen,
    DatabaseUnavailable,
    EngineStats,
    Event,
    Invalidation,
    Policy,
    PoolStats,
    Replay,
    RetryDetails,
    add_event_hook,
    create_resilient_engine,
    get_stats,
    remove_event_hook,
)
from dbresilience.testing import PostgresCluster

APP = "observed"


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresCluster]:
    """A server of its own (restarted and stopped here), with a password for the app role."""
    yield from scram_cluster()


class Observed:
    """An engine with every exporter attached, and what each of them saw."""

    def __init__(self, pg: PostgresCluster, policy: Policy) -> None:
        url = pg.url(user=SCRAM_ROLE, password=SCRAM_SECRET) + f"?application_name={APP}"
        self.engine: Engine = create_resilient_engine(url, pool_size=1, policy=policy)
        with self.engine.connect():  # the dialect's own first queries: not counted below
            pass
        self.events: list[Event] = []
        add_event_hook(self.events.append, engine=self.engine)
        self.registry = CollectorRegistry()
        self.collector = dbresilience.register_prometheus(self.engine, registry=self.registry)
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.otel = dbresilience.instrument_opentelemetry(
            self.engine, meter_provider=self.provider
        )

    def close(self) -> None:
        remove_event_hook(self.events.append, engine=self.engine)
        self.collector.unregister()
        self.otel.close()
        self.provider.shutdown()
        self.engine.dispose()

    def select(self, n: int = 1) -> None:
        for _ in range(n):
            with self.engine.connect() as conn:
                assert conn.execute(text("select 1")).scalar_one() == 1

    def scrape(self) -> tuple[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
        """The Prometheus text exposition, and its samples by (name, labels)."""
        exposition = generate_latest(self.registry).decode()
        samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(exposition)
            for s in family.samples
        }
        return exposition, samples

    def otel_points(self) -> dict[tuple[str, frozenset[tuple[str, Any]]], Any]:
        """Every OpenTelemetry data point by (metric name, attributes)."""
        data = self.reader.get_metrics_data()
        points: dict[tuple[str, frozenset[tuple[str, Any]]], Any] = {}
        assert data is not None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        points[(metric.name, frozenset(point.attributes.items()))] = point
        return points


def _prom(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset({"engine": POOL[0], **labels}.items())), 0.0)


POOL = [""]  # the pool name, set by the test (host:port/database)


def _otel(points: dict[Any, Any], name: str, **attributes: Any) -> float:
    pool = {"db.client.connection.pool.name": POOL[0], **attributes}
    point = points.get((name, frozenset(pool.items())))
    return 0 if point is None else point.value


def _delta(before: EngineStats, after: EngineStats) -> dict[str, int]:
    # The hang monitor's own connection is remade in the background, at its own pace.
    keys = set(before.counters) | set(after.counters)
    keys.discard("hang.monitor.connections")
    changed = {k: after[k] - before[k] for k in keys}
    return {k: v for k, v in changed.items() if v}


def _kill_app_backends(pg: PostgresCluster) -> None:
    assert pg.terminate_backends(application_name=APP) == 1


def test_kill_restart_and_breaker_are_counted_the_same_everywhere(
    pg: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dbresilience")
    policy = Policy(
        liveness_window=3600,  # a dead pooled connection is met by the statement: a replay
        connect_deadline=1.5,
        connect_wait_max=0.1,
        breaker_failures=3,
        breaker_min_duration=0.3,
    )
    observed = Observed(pg, policy)
    engine = observed.engine
    POOL[0] = f"127.0.0.1:{pg.port}/postgres"
    try:
        observed.select(5)
        start = get_stats(engine)
        assert start.pool.size == 1 and start.pool.idle == 1 and start.pool.checked_out == 0
        assert start.pool.waiting == 0 and start.breaker == "closed"
        assert start.replays == 0 and start.counters.get("connect.failed") is None

        # 1. A killed backend: the next transaction's first statement is replayed.
        _kill_app_backends(pg)
        observed.select()
        after_kill = get_stats(engine)
        assert _delta(start, after_kill) == {
            "invalidated.pool": 1,
            "retry.statement": 1,
            "retry.statement.disconnect": 1,
            "replay.statement": 1,
        }
        assert [type(e) for e in observed.events] == [Invalidation, RetryDetails, Replay]
        replay = observed.events[-1]
        assert isinstance(replay, Replay) and replay.classification.sqlstate == "57P01"

        # 2. A restart: every pooled connection is dead; the same recovery.
        pg.restart()
        observed.select()
        after_restart = get_stats(engine)
        assert _delta(after_kill, after_restart) == {
            "invalidated.pool": 1,
            "retry.statement": 1,
            "retry.statement.disconnect": 1,
            "replay.statement": 1,
        }
        assert after_restart.replays == 2 and after_restart.retries.statement == 2

        # 3. The server stays down: connects fail, retried, until the breaker opens.
        pg.stop()
        observed.engine.pool.dispose()  # no pooled connection: the next checkout connects
        with pytest.raises((DatabaseUnavailable, CircuitOpen)):
            observed.select()
        deadline = time.monotonic() + 10
        while get_stats(engine).breaker_opened == 0 and time.monotonic() < deadline:
            with pytest.raises((DatabaseUnavailable, CircuitOpen)):
                observed.select()
        while_down = get_stats(engine)
        assert while_down.breaker_opened == 1
        assert while_down.breaker in ("open", "half-open")
        pg.start()
        deadline = time.monotonic() + 10
        while True:  # the next probe slot closes it
            try:
                observed.select()
                break
            except CircuitOpen:
                assert time.monotonic() < deadline, "breaker never closed"
                time.sleep(0.05)
        end = get_stats(engine)
        assert end.breaker == "closed"
        assert end.counters["breaker.closed"] == 1
        assert end.breaker_opened == 1
        assert end.connect_failures >= policy.breaker_failures
        # Every failed connect that was followed by another attempt is a retry.
        assert 0 < end.retries.connect <= end.connect_failures
        transitions = [(e.old, e.new) for e in observed.events if isinstance(e, BreakerTransition)]
        assert transitions[0] == ("closed", "open") and transitions[-1] == ("half-open", "closed")
        assert transitions.count(("closed", "open")) == 1
        assert transitions.count(("open", "half-open")) == end.counters["breaker.half-open"]
        probes = end.counters["breaker.half-open"]
        assert probes >= 1

        # The same numbers in the events, the Prometheus scrape and the OpenTelemetry reader.
        def events(kind: type) -> int:
            return sum(isinstance(e, kind) for e in observed.events)

        assert events(Replay) == end.replays == 2
        assert events(RetryDetails) == end.retries.connect + end.retries.statement
        assert events(dbresilience.ConnectFailure) == end.connect_failures
        assert events(Invalidation) == end.invalidated_pools + end.invalidated_connections

        exposition, prom = observed.scrape()
        assert _prom(prom, "dbresilience_replays_total") == 2
        assert (
            _prom(prom, "dbresilience_retries_total", what="statement", cause="disconnect") == 2
        )
        assert _prom(prom, "dbresilience_retries_total", what="connect", cause="unavailable") == (
            end["retry.connect.unavailable"]
        )
        assert _prom(prom, "dbresilience_connect_failures_total") == end.connect_failures
        assert _prom(prom, "dbresilience_invalidations_total", scope="pool") == 2
        assert _prom(prom, "dbresilience_breaker_opened_total") == 1
        assert _prom(prom, "dbresilience_breaker_state", state="closed") == 1
        assert _prom(prom, "dbresilience_breaker_state", state="open") == 0
        assert _prom(prom, "dbresilience_pool_connections", state="idle") == 1
        assert _prom(prom, "dbresilience_pool_connections", state="used") == 0
        assert _prom(prom, "dbresilience_pool_max_connections") == 1 + 10  # max_overflow=10
        assert _prom(prom, "dbresilience_pool_timeouts_total") == 0
        # One observation per checkout that got a connection: 5 + kill + restart + the last.
        assert _prom(prom, "dbresilience_pool_acquire_seconds_count") == 8

        points = observed.otel_points()
        assert _otel(points, "dbresilience.replays") == 2
        assert _otel(points, "dbresilience.connect.failures") == end.connect_failures
        assert _otel(points, "dbresilience.breaker.opened") == 1
        assert _otel(points, "dbresilience.breaker.state") == 0
        assert (
            _otel(
                points,
                "dbresilience.retries",
                **{"dbresilience.retry.what": "statement", "dbresilience.cause": "disconnect"},
            )
            == 2
        )
        state = "db.client.connection.state"
        assert _otel(points, "db.client.connection.count", **{state: "idle"}) == 1
        assert _otel(points, "db.client.connection.count", **{state: "used"}) == 0
        assert _otel(points, "db.client.connection.max") == 11
        assert _otel(points, "db.client.connection.idle.max") == 1
        assert _otel(points, "db.client.connection.pending_requests") == 0
        assert _otel(points, "db.client.connection.timeouts") == 0
        pool = frozenset({"db.client.connection.pool.name": POOL[0]}.items())
        assert points[("db.client.connection.wait_time", pool)].count == 8
        assert points[("db.client.connection.use_time", pool)].count == 8
        # Connections made: after the kill, the restart and the outage.
        assert points[("db.client.connection.create_time", pool)].count == 3
        durations = [
            (attrs, p)
            for (name, attrs), p in points.items()
            if name == "db.client.operation.duration"
        ]
        ok = [p for attrs, p in durations if "error.type" not in dict(attrs)]
        assert sum(p.count for p in ok) == 8  # the replayed statements count once, as a success
        assert all(dict(attrs)["db.system.name"] == "postgresql" for attrs, _ in durations)

        # Never the password: logs, events, stats, Prometheus labels, OpenTelemetry attributes.
        haystacks = [r.getMessage() for r in caplog.records]
        haystacks += [repr(r.args) for r in caplog.records]
        haystacks += [repr(e) for e in observed.events]
        haystacks += [repr(end), repr(dict(end.counters)), exposition]
        haystacks += [repr(key) for key in points]
        assert len(caplog.records) >= len(observed.events)  # one line per event at least
        leaked = [h for h in haystacks if SCRAM_SECRET in h]
        assert not leaked, leaked[:3]
        assert any("sqlstate=57P01" in r.getMessage() for r in caplog.records)
    finally:
        if not pg.is_running():
            pg.start()
        observed.close()


def test_operation_errors_pool_timeouts_and_waiting(shared_pg: PostgresCluster) -> None:
    engine = create_resilient_engine(
        shared_pg.url(), pool_size=1, max_overflow=0, pool_timeout=0.3
    )
    with engine.connect():
        pass
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    otel = dbresilience.instrument_opentelemetry(
        engine, meter_provider=provider, pool_name="orders-db"
    )
    try:
        with engine.connect() as conn, pytest.raises(ProgrammingError):
            conn.execute(text("select * from no_such_table"))
        held = engine.connect()
        waiting: list[int] = []
        done = threading.Event()

        def watch() -> None:  # the blocked checkout below is counted as waiting
            while not done.is_set():
                waiting.append(get_stats(engine).pool.waiting)
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with pytest.raises(sa_exc.TimeoutError):
                engine.connect()
        finally:
            done.set()
            watcher.join(5)
            held.close()
        stats = get_stats(engine)
        assert stats.pool.timeouts == 1 and stats.pool.waiting == 0
        assert max(waiting) == 1
        assert stats.pool.max == 1 and stats.pool.overflow == 0
        data = reader.get_metrics_data()
        assert data is not None
        metrics = {
            m.name: m
            for r in data.resource_metrics
            for s in r.scope_metrics
            for m in s.metrics
        }
        failed = [
            p
            for p in metrics["db.client.operation.duration"].data.data_points
            if "error.type" in p.attributes
        ]
        assert len(failed) == 1 and failed[0].count == 1
        assert failed[0].attributes["error.type"] == "42P01"
        assert failed[0].attributes["db.response.status_code"] == "42P01"
        (timeouts,) = metrics["db.client.connection.timeouts"].data.data_points
        assert timeouts.value == 1
        assert timeouts.attributes == {"db.client.connection.pool.name": "orders-db"}
        assert metrics["db.client.connection.max"].unit == "{connection}"
        assert metrics["db.client.operation.duration"].unit == "s"
    finally:
        otel.close()
        provider.shutdown()
        engine.dispose()


def test_statement_timeout_is_an_event_and_a_series(shared_pg: PostgresCluster) -> None:
    engine = create_resilient_engine(shared_pg.url(), policy=Policy(command_timeout=0.5))
    registry = CollectorRegistry()
    collector = dbresilience.register_prometheus(engine, registry=registry, name="slow")
    seen: list[Event] = []
    add_event_hook(seen.append)  # every engine
    try:
        with engine.connect() as conn, pytest.raises(dbresilience.StatementTimeout):
            conn.execute(text("select pg_sleep(5)"))
        name = get_stats(engine).engine
        deadline = time.monotonic() + 5  # announced by the watchdog's thread, after the cut
        while not any(isinstance(e, dbresilience.StatementTimedOut) for e in seen):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        mine = sorted((type(e).__name__, e) for e in seen if e.engine == name)
        assert [kind for kind, _ in mine] == ["Invalidation", "StatementTimedOut"]
        assert mine[0][1] == Invalidation(name, "connection", "timeout")
        assert get_stats(engine).statement_timeouts == 1
        samples = {
            (s.name, s.labels.get("engine")): s.value
            for f in text_string_to_metric_families(generate_latest(registry).decode())
            for s in f.samples
        }
        assert samples[("dbresilience_statement_timeouts_total", "slow")] == 1
    finally:
        remove_event_hook(seen.append)
        collector.unregister()
        engine.dispose()


async def _async_instrumented(url: str) -> tuple[EngineStats, float]:
    from sqlalchemy.ext.asyncio import AsyncEngine

    engine: AsyncEngine = dbresilience.create_async_resilient_engine(url, pool_size=2)
    registry = CollectorRegistry()
    collector = dbresilience.register_prometheus(engine, registry=registry)
    try:
        for _ in range(3):
            async with engine.connect() as conn:
                await conn.execute(text("select 1"))
        samples = {
            s.name: s.value
            for f in text_string_to_metric_families(generate_latest(registry).decode())
            for s in f.samples
        }
        return get_stats(engine), samples["dbresilience_pool_acquire_seconds_count"]
    finally:
        collector.unregister()
        await engine.dispose()


def test_async_engine_exports_too(shared_pg: PostgresCluster) -> None:
    url = shared_pg.url().replace("+psycopg", "+asyncpg")
    stats, acquired = asyncio.run(_async_instrumented(url))
    assert acquired == 3
    assert stats.pool.size == 2 and stats.pool.checked_out == 0 and stats.pool.idle == 1


def test_nothing_is_imported_until_asked() -> None:
    code = (
        "import sys, dbresilience;"
        "e = dbresilience.create_resilient_engine('postgresql+psycopg://u:p@127.0.0.1:1/d');"
        "print(sorted(m for m in sys.modules if m.startswith(('prometheus', 'opentelemetry'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_engine_stats_reads_like_the_old_counters_dict() -> None:
    stats = EngineStats.build(
        "e", {"retry.connect": 2, "retry.connect.unavailable": 2}, PoolStats(), None
    )
    assert "retry.connect" in stats and "replay.statement" not in stats
    assert stats["retry.connect.unavailable"] == 2 and stats["replay.statement"] == 0
    assert stats.get("replay.statement") is None and stats.get("replay.statement", 7) == 7
    assert sorted(stats) == ["retry.connect", "retry.connect.unavailable"]
    assert stats.retries.connect == 2 and stats.replays == 0


def test_opentelemetry_timings_can_be_chosen(shared_pg: PostgresCluster) -> None:
    engine = create_resilient_engine(shared_pg.url())
    with engine.connect():  # the dialect's first queries: before the exporter
        pass
    with pytest.raises(ValueError, match="timings: unknown"):
        dbresilience.instrument_opentelemetry(engine, timings=("wait", "latency"))
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    otel = dbresilience.instrument_opentelemetry(
        engine, meter_provider=provider, timings=("operation",)
    )
    try:
        for _ in range(3):
            with engine.connect() as conn:
                conn.execute(text("select 1"))
        data = reader.get_metrics_data()
        assert data is not None
        counts = {
            m.name: sum(getattr(p, "count", 0) for p in m.data.data_points)
            for r in data.resource_metrics
            for s in r.scope_metrics
            for m in s.metrics
        }
        assert counts["db.client.operation.duration"] == 3
        assert counts.get("db.client.connection.wait_time", 0) == 0
        assert counts.get("db.client.connection.use_time", 0) == 0
        assert "db.client.connection.count" in counts  # read at collection, always there
    finally:
        otel.close()
        provider.shutdown()
        engine.dispose()
