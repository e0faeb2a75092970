"""Exporters of what resilient engines do: OpenTelemetry metrics, a Prometheus collector, and
the timings both record. Each imports its library only when the application asks for it."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from dbresilience._engine import DEFAULT_PORT, url_hosts
from dbresilience._errors import ConfigurationError

__all__ = ["pool_name"]


def pool_name(engine: Engine) -> str:
    """OpenTelemetry's default pool name, ``server.address:server.port/db.namespace`` (the
    first host of a multi-host URL); never the password or the user."""
    url = engine.url
    try:
        host, port = url_hosts(url)[0]
    except ConfigurationError:  # the driver will say what is wrong with it
        host, port = url.host, url.port or DEFAULT_PORT
    return f"{host or 'localhost'}:{port}/{url.database or ''}"
