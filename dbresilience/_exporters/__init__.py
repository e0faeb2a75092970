"""Exporters of what resilient engines do: OpenTelemetry metrics, a Prometheus collector, and
the timings both record. Each imports its library only when the application asks for it."""

from __future__ import annotations

from sqlalchemy.engine import Engine

__all__ = ["pool_name"]


def pool_name(engine: Engine) -> str:
    """OpenTelemetry's default pool name, ``server.address:server.port/db.namespace`` (the
    first host of a multi-host URL); never the password or the user."""
    url = engine.url
    host = url.host
    port = url.port
    if host is None:  # hosts in the query: postgresql+psycopg://u@/db?host=a:1&host=b:2
        hosts = url.query.get("host")
        first = hosts[0] if isinstance(hosts, tuple) and hosts else hosts
        if isinstance(first, str):
            host, _, given = first.partition(":")
            port = int(given) if given.isdigit() else None
    return f"{host or 'localhost'}:{port or 5432}/{url.database or ''}"
