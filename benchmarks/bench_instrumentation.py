"""Cost of exporting metrics: a resilient engine without exporters vs the same with the
OpenTelemetry SDK (an in-memory reader) and the Prometheus collector attached.

One op is ``with engine.connect() as c: c.execute(text("select 1"))`` (checkout, one round
trip, checkin) on one thread, engines interleaved (see ``_harness``); the baseline is the
resilient engine without exporters, and "plain" (SQLAlchemy's own engine) is shown for scale.
The readers are collected once per engine at the end (a scrape costs nothing per op). Usage::

    python benchmarks/bench_instrumentation.py [--seconds S] [--rounds R]
"""

from __future__ import annotations

from typing import Any

from _harness import compare_engines
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, create_engine, text

import dbresilience
from dbresilience import create_resilient_engine

SELECT_1 = text("select 1")
_keep: list[Any] = []  # the providers and collectors live as long as the engines


def checkout_select_1(engine: Engine) -> None:
    """The measured op."""
    with engine.connect() as conn:
        conn.execute(SELECT_1)


def with_opentelemetry(url: str) -> Engine:
    """A resilient engine exporting to the OpenTelemetry SDK (in-memory reader)."""
    engine = create_resilient_engine(url)
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    metrics = dbresilience.instrument_opentelemetry(engine, meter_provider=provider)
    _keep.append((provider, metrics))
    return engine


def with_opentelemetry_operations_only(url: str) -> Engine:
    """The OpenTelemetry SDK, recording only ``db.client.operation.duration`` per statement."""
    engine = create_resilient_engine(url)
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    metrics = dbresilience.instrument_opentelemetry(
        engine, meter_provider=provider, timings=("operation",)
    )
    _keep.append((provider, metrics))
    return engine


def with_opentelemetry_no_timings(url: str) -> Engine:
    """The OpenTelemetry SDK, no per-operation histogram (counts read at collection only)."""
    engine = create_resilient_engine(url)
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    metrics = dbresilience.instrument_opentelemetry(engine, meter_provider=provider, timings=())
    _keep.append((provider, metrics))
    return engine


def with_opentelemetry_api_only(url: str) -> Engine:
    """Instrumented through the API with no SDK (a no-op meter provider): our own share of
    the cost - the timing wrappers - without the SDK's per-record work."""
    engine = create_resilient_engine(url)
    noop = NoOpMeterProvider()
    _keep.append(dbresilience.instrument_opentelemetry(engine, meter_provider=noop))
    return engine


def with_prometheus(url: str) -> Engine:
    """A resilient engine with its Prometheus collector registered."""
    engine = create_resilient_engine(url)
    _keep.append(dbresilience.register_prometheus(engine, registry=CollectorRegistry()))
    return engine


def main(argv: list[str] | None = None) -> int:
    """Benchmark the engines on a fresh server and print the report."""
    return compare_engines(
        argv,
        doc=__doc__,
        title="exporters' cost: checkout + select 1 + checkin, psycopg, one thread",
        factories={
            "resilient": create_resilient_engine,
            "otel_api_only": with_opentelemetry_api_only,
            "otel_sdk": with_opentelemetry,
            "otel_sdk_ops": with_opentelemetry_operations_only,
            "otel_sdk_none": with_opentelemetry_no_timings,
            "prometheus": with_prometheus,
            "plain": create_engine,
        },
        op=checkout_select_1,
    )


if __name__ == "__main__":
    raise SystemExit(main())
