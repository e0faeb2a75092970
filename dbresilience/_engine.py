"""``create_resilient_engine()`` / ``create_async_resilient_engine()``: genuine SQLAlchemy
engines with dbresilience installed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url

from dbresilience._engine_hooks import install
from dbresilience._errors import ConfigurationError
from dbresilience._policy import Policy
from dbresilience._redaction import mask_url, redact

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "ASYNC_DRIVERS",
    "SYNC_DRIVERS",
    "check_url",
    "create_async_resilient_engine",
    "create_resilient_engine",
    "parse_url",
]

SYNC_DRIVERS = ("psycopg",)
ASYNC_DRIVERS = ("asyncpg", "psycopg", "psycopg_async")


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


def check_url(url: URL, *, is_async: bool) -> None:
    """Refuse non-PostgreSQL URLs and unsupported drivers before any driver is imported."""
    backend = url.get_backend_name()
    if backend != "postgresql":
        raise ConfigurationError(
            f"dbresilience supports PostgreSQL only, not {backend!r} (URL {mask_url(url)})"
        )
    driver = url.get_driver_name() if "+" in url.drivername else "psycopg"
    wanted = ASYNC_DRIVERS if is_async else SYNC_DRIVERS
    if driver not in wanted:
        factory = "create_async_resilient_engine" if is_async else "create_resilient_engine"
        hint = (
            " (an asyncio driver: use create_async_resilient_engine())"
            if driver in ASYNC_DRIVERS and not is_async
            else ""
        )
        raise ConfigurationError(
            f"unsupported PostgreSQL driver {driver!r} for {factory}(){hint}; use "
            + " or ".join(f"postgresql+{d}://" for d in wanted)
        )


def create_resilient_engine(
    url: str | URL, *, policy: Policy | None = None, **create_engine_kwargs: Any
) -> Engine:
    """Create a SQLAlchemy :class:`~sqlalchemy.engine.Engine` that survives database faults.

    Same arguments as :func:`sqlalchemy.create_engine`, plus ``policy``. Only
    ``postgresql+psycopg://`` is accepted here (``postgresql://`` means psycopg on
    SQLAlchemy 2.1); anything else raises :class:`ConfigurationError` naming the problem.
    """
    parsed = parse_url(url)
    check_url(parsed, is_async=False)
    engine = create_engine(parsed, **create_engine_kwargs)
    install(engine, policy)
    return engine


def create_async_resilient_engine(
    url: str | URL, *, policy: Policy | None = None, **create_engine_kwargs: Any
) -> AsyncEngine:
    """Create a SQLAlchemy :class:`~sqlalchemy.ext.asyncio.AsyncEngine` that survives faults.

    Same arguments as :func:`sqlalchemy.ext.asyncio.create_async_engine`, plus ``policy``.
    Accepts ``postgresql+asyncpg://`` and ``postgresql+psycopg://`` (psycopg's async mode;
    ``postgresql+psycopg_async://`` too). The guarantees are those of
    :func:`create_resilient_engine`: the same listeners run on ``engine.sync_engine``.
    """
    parsed = parse_url(url)
    check_url(parsed, is_async=True)
    # Imported here: plain sync users need neither sqlalchemy.ext.asyncio nor greenlet.
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(parsed, **create_engine_kwargs)
    install(engine, policy)
    return engine
