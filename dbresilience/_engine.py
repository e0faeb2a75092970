"""``create_resilient_engine()``: a genuine SQLAlchemy Engine with dbresilience installed."""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url

from dbresilience._engine_hooks import install
from dbresilience._errors import ConfigurationError
from dbresilience._policy import Policy
from dbresilience._redaction import redact

__all__ = ["create_resilient_engine", "parse_url"]


def parse_url(url: str | URL) -> URL:
    """Parse ``url``, raising :class:`ConfigurationError` (password masked) when malformed."""
    if isinstance(url, URL):
        return url
    if not isinstance(url, str):
        raise ConfigurationError(f"database URL must be a string or URL, got {type(url).__name__}")
    try:
        return make_url(url)
    except (sa_exc.ArgumentError, ValueError) as exc:
        raise ConfigurationError(
            f"malformed database URL {redact(url)!r}: {redact(str(exc))}; expected "
            "postgresql+psycopg://user:password@host:port/dbname"
        ) from None


def create_resilient_engine(
    url: str | URL, *, policy: Policy | None = None, **create_engine_kwargs: Any
) -> Engine:
    """Create a SQLAlchemy :class:`~sqlalchemy.engine.Engine` that survives database faults.

    Same arguments as :func:`sqlalchemy.create_engine`, plus ``policy``. Only
    ``postgresql+psycopg://`` is accepted here (``postgresql://`` means psycopg on
    SQLAlchemy 2.1); anything else raises :class:`ConfigurationError` naming the problem.
    """
    parsed = parse_url(url)
    engine = create_engine(parsed, **create_engine_kwargs)
    if engine.dialect.is_async:
        raise ConfigurationError(
            f"{parsed.drivername!r} is an asyncio driver: use create_async_resilient_engine()"
        )
    install(engine, policy)
    return engine
