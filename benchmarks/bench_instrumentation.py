"""Cost of exporting metrics: a resilient engine without exporters vs the same with the
OpenTelemetry SDK (an in-memory reader) and the Prometheus collector attached.

One op is ``with engine.connect() as c: c.execute(text("select 1"))`` (checkout, one round
trip, checkin) on one thread, engines interleaved (see ``_harness``); the baseline is the
resilient engine without exporters, and "plain" (SQLAlchemy's own engine) is shown for scale.
The readers are collected once per engine at the end (a scrape costs nothing per op). Usage::

    python benchmarks/bench_instrumentation.py [--seconds S] [--rounds R]
"""

from __future__ import annotations

from collections.abc import Callable
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


def with_opentelemetry(
    *, sdk: bool = True, timings: tuple[str, ...] | None = None
) -> Callable[[str], Engine]:
    """A factory of resilient engines exporting through OpenTelemetry: to the SDK (an
    in-memory reader), or through the API alone with a no-op provider (our own share of the
    cost, the timing wrappers, without the SDK's per-record work); ``timings`` as in
    ``instrument_opentelemetry`` (None: its default, every timing)."""

    def make(url: str) -> Engine:
        engine = create_resilient_engine(url)
        provider = MeterProvider(metric_readers=[InMemoryMetricReader()]) if sdk else None
        chosen = {} if timings is None else {"timings": timings}
        metrics = dbresilience.instrument_opentelemetry(
            engine, meter_provider=provider or NoOpMeterProvider(), **chosen
        )
        _keep.append((provider, metrics))
        return engine

    return make


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
            "otel_api_only": with_opentelemetry(sdk=False),
            "otel_sdk": with_opentelemetry(),
            "otel_sdk_ops": with_opentelemetry(timings=("operation",)),
            "otel_sdk_none": with_opentelemetry(timings=()),
            "prometheus": with_prometheus,
            "plain": create_engine,
        },
        op=checkout_select_1,
    )


if __name__ == "__main__":
    raise SystemExit(main())
