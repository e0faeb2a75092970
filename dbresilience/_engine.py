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
    "DEFAULT_PORT",
    "SYNC_DRIVERS",
    "check_url",
    "create_async_resilient_engine",
    "create_resilient_engine",
    "parse_url",
    "url_hosts",
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


DEFAULT_PORT = 5432


def url_hosts(url: URL) -> list[tuple[str | None, int]]:
    """Every ``(host, port)`` a PostgreSQL URL names, in order: the URL's own host, then
    ``?host=`` (repeated or comma-separated; ``host:port``, ``[v6]:port``, a socket directory),
    with ``?port=`` (one for all, or one each); ``[(None, port)]`` when it names none.
    :class:`ConfigurationError` for an invalid port or mismatched host and port counts."""
    query = url.query
    items = _as_list(url.host) + _as_list(query.get("host"))
    ports = [_port(p) for p in _as_list(query.get("port"))]
    default = url.port or (ports[0] if len(ports) == 1 else DEFAULT_PORT)
    if not items:
        return [(None, default)]
    if len(ports) > 1 and len(ports) != len(items):
        raise ConfigurationError(f"{len(items)} hosts but {len(ports)} ports")
    found: list[tuple[str | None, int]] = []
    for i, item in enumerate(items):
        host, port = _split_host_port(item)
        if port is None:
            port = ports[i] if len(ports) > 1 else default
        found.append((host, port))
    return found


def _as_list(value: str | tuple[str, ...] | None) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def _split_host_port(item: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address."""
    if item.startswith("/"):
        return item, None
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        return host, _port(rest[1:]) if rest.startswith(":") else None
    if item.count(":") == 1:
        host, port = item.split(":")
        return host, _port(port)
    return item, None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigurationError(f"invalid port {text!r}") from None
    if not 0 < port < 65536:
        raise ConfigurationError(f"invalid port {port}")
    return port


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
