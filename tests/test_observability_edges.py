"""Observability as applications meet it: two engines on one MeterProvider or Prometheus
registry, an ``execution_options()`` engine, a password in the URL query, the stats read as
the old dict (each of these failed on e26e94b, found in review)."""

from __future__ import annotations

import gc
import io
import logging
import subprocess
import sys

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from sqlalchemy import text

import dbresilience
from dbresilience import add_event_hook, create_resilient_engine, get_stats
from dbresilience.testing import PostgresCluster

SECRET = "s3cr3tPW"


def _points(reader: InMemoryMetricReader, name: str) -> list[dict]:
    data = reader.get_metrics_data()
    return [
        dict(p.attributes)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == name
        for p in m.data.data_points
    ]


def test_two_engines_on_one_meter_provider_both_report_pool_state(
    shared_pg: PostgresCluster,
) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    first = create_resilient_engine(shared_pg.url(database="postgres"), pool_size=2)
    second = create_resilient_engine(shared_pg.url(database="template1"), pool_size=7)
    try:
        dbresilience.instrument_opentelemetry(first, meter_provider=provider)
        dbresilience.instrument_opentelemetry(second, meter_provider=provider)
        points = _points(reader, "db.client.connection.idle.max")
        pools = {p["db.client.connection.pool.name"] for p in points}
        assert pools == {
            f"{shared_pg.host}:{shared_pg.port}/postgres",
            f"{shared_pg.host}:{shared_pg.port}/template1",
        }
    finally:
        provider.shutdown()
        first.dispose()
        second.dispose()


def test_two_engines_on_one_registry_give_a_valid_exposition(shared_pg: PostgresCluster) -> None:
    # A writer pool and a reporting pool on one database: the same default name is refused,
    # names of their own give one family per series with both engines' samples.
    registry = CollectorRegistry()
    writer = create_resilient_engine(shared_pg.url(), pool_size=5)
    reports = create_resilient_engine(shared_pg.url(), pool_size=2)
    try:
        dbresilience.register_prometheus(writer, registry=registry)
        with pytest.raises(ValueError, match="already exported to this registry"):
            dbresilience.register_prometheus(reports, registry=registry)
        dbresilience.register_prometheus(reports, registry=registry, name="reports")
        families = {
            f.name: f
            for f in text_string_to_metric_families(openmetrics_latest(registry).decode())
        }
        sizes = {
            s.labels["engine"]: s.value
            for s in families["dbresilience_pool_max_connections"].samples
        }
        assert sizes == {f"127.0.0.1:{shared_pg.port}/postgres": 15, "reports": 12}
    finally:
        writer.dispose()
        reports.dispose()


def test_collector_of_an_execution_options_engine_keeps_reporting(
    shared_pg: PostgresCluster,
) -> None:
    registry = CollectorRegistry()
    engine = create_resilient_engine(shared_pg.url())
    try:
        dbresilience.register_prometheus(
            engine.execution_options(isolation_level="AUTOCOMMIT"), registry=registry
        )
        gc.collect()
        assert "dbresilience_pool_connections" in generate_latest(registry).decode()
    finally:
        engine.dispose()


def test_no_password_from_the_url_query_in_events_logs_or_stats(
    shared_pg: PostgresCluster,
) -> None:
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("dbresilience").addHandler(handler)
    engine = create_resilient_engine(
        shared_pg.url() + f"?application_name=revleak&password={SECRET}", pool_size=1
    )
    events: list = []
    add_event_hook(events.append, engine=engine)
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        assert shared_pg.terminate_backends(application_name="revleak") == 1
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        assert events
        assert [e.engine for e in events if SECRET in e.engine] == []
        assert SECRET not in get_stats(engine).engine
        assert SECRET not in log.getvalue()
    finally:
        logging.getLogger("dbresilience").removeHandler(handler)
        engine.dispose()


def test_check_json_masks_the_query_password_in_engine_figures(shared_pg: PostgresCluster) -> None:
    url = shared_pg.url() + f"?password={SECRET}"
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from dbresilience.cli import main; "
         "sys.argv[0] = 'dbresilience'; sys.exit(main())", "check", "--json", url],
        capture_output=True, text=True, timeout=60,
    )
    assert SECRET not in out.stdout + out.stderr, [
        line for line in out.stdout.splitlines() if SECRET in line
    ]


def test_engine_stats_converts_to_a_dict_like_the_old_counters(shared_pg: PostgresCluster) -> None:
    engine = create_resilient_engine(shared_pg.url() + "?application_name=revdict", pool_size=1)
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        assert shared_pg.terminate_backends(application_name="revdict") == 1
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        stats = get_stats(engine)
        assert stats.replays == 1
        assert dict(stats) == dict(stats.counters)
    finally:
        engine.dispose()
