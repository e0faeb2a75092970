"""``dbresilience check``: the settings a resilient engine would use for a URL, and the
warnings about risky ones (no I/O: everything comes from the URL and the probes' result)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import URL

from dbresilience._drivers import driver_for
from dbresilience._engine import ASYNC_DRIVERS, SYNC_DRIVERS
from dbresilience._policy import Policy

if TYPE_CHECKING:
    from dbresilience.cli._check import CheckResult, Setting

__all__ = [
    "ASYNCPG_SSL",
    "NO_PREPARED_STATEMENTS",
    "effective_settings",
    "query_value",
    "warnings_for",
]

_NETWORK_OPTIONS = (
    ("connect_timeout", "s"),
    ("keepalives", ""),
    ("keepalives_idle", "s"),
    ("keepalives_interval", "s"),
    ("keepalives_count", ""),
    ("tcp_user_timeout", "ms"),
)
#: What turns a driver's server-side prepared statements off, for a transaction pooler.
NO_PREPARED_STATEMENTS = {
    "psycopg": 'connect_args={"prepare_threshold": None}',
    "asyncpg": 'connect_args={"statement_cache_size": 0}',
}
#: asyncpg's ``ssl=`` values, as libpq sslmodes.
ASYNCPG_SSL = {"true": "require", "false": "disable"}
_MAX_CONNECT_TIMEOUT = 30  # seconds; more in the URL is flagged as over-large


def query_value(url: URL, name: str) -> str | None:
    value = url.query.get(name)
    if value is None:
        return None
    return value if isinstance(value, str) else value[-1]


def effective_settings(url: URL) -> list[Setting]:
    """Network settings a resilient engine uses for ``url``: the URL's own, else Policy's."""
    from dbresilience.cli._check import Setting
    from_url = {name: query_value(url, name) for name, _ in _NETWORK_OPTIONS}
    cparams: dict[str, Any] = {k: v for k, v in from_url.items() if v is not None}
    driver_for("psycopg").apply_network_defaults(cparams, Policy())
    return [
        Setting(
            name=name,
            value=str(cparams.get(name)),
            unit=unit,
            source="url" if from_url[name] is not None else "policy",
        )
        for name, unit in _NETWORK_OPTIONS
    ]


def warnings_for(url: URL, driver: str, result: CheckResult, ignored: list[str]) -> list[str]:
    out: list[str] = []
    if driver not in SYNC_DRIVERS + ASYNC_DRIVERS:
        out.append(
            f"driver {driver!r} is not supported by dbresilience: use postgresql+psycopg:// "
            "or postgresql+asyncpg:// (this check used psycopg)"
        )
    out.extend(
        f"URL option {name!r} is not a libpq option; this check ignored it" for name in ignored
    )
    sslmode = (query_value(url, "sslmode") or "").lower()
    if driver == "asyncpg" and "ssl" in url.query:
        sslmode = ASYNCPG_SSL.get((query_value(url, "ssl") or "").lower(), "")
    for check in result.hosts:
        if check.local:
            continue
        where = check.label
        if sslmode == "disable":
            out.append(f"sslmode=disable to non-local host {where}: traffic is unencrypted")
        elif check.tls is False:
            out.append(
                f"no TLS to non-local host {where}: the password and data cross the network "
                "unencrypted; set sslmode=verify-full (or require)"
            )
        elif check.tls and sslmode in ("", "prefer", "allow"):
            out.append(
                f"sslmode={sslmode or 'prefer'} to {where}: TLS is not required, an attacker "
                "can downgrade it; set sslmode=verify-full (or require)"
            )
    if query_value(url, "keepalives") == "0":
        out.append(
            "keepalives=0 in the URL: a connection whose peer vanished silently is noticed only "
            "when the kernel gives up retransmitting (many minutes)"
        )
    if query_value(url, "tcp_user_timeout") == "0":
        out.append("tcp_user_timeout=0 in the URL: unacknowledged data may wait for minutes")
    default_timeout = Policy().connect_timeout
    connect_timeout = query_value(url, "connect_timeout")
    if connect_timeout is None:
        out.append(
            "connect_timeout is not set in the URL: a plain create_engine() waits as long as "
            f"the OS does for an unreachable host (create_resilient_engine() uses "
            f"{default_timeout:g} s)"
        )
    else:
        try:
            seconds = float(connect_timeout)
        except ValueError:
            out.append(f"connect_timeout={connect_timeout!r} in the URL is not a number")
        else:
            if seconds <= 0 or seconds > _MAX_CONNECT_TIMEOUT:
                what = "waits forever" if seconds <= 0 else f"waits {seconds:g} s"
                out.append(
                    f"connect_timeout={connect_timeout} in the URL: each connect attempt to an "
                    f"unreachable host {what} (create_resilient_engine()'s default is "
                    f"{default_timeout:g} s)"
                )
    pooled = [h.label for h in result.hosts if h.pooler]
    if pooled:
        setting = NO_PREPARED_STATEMENTS.get(driver, NO_PREPARED_STATEMENTS["psycopg"])
        out.append(
            f"{', '.join(pooled)}: a connection pooler answers (its backend pid is not the "
            "server's). If it pools transactions (PgBouncer pool_mode=transaction, without "
            "max_prepared_statements: before 1.21 or set to 0), turn server-side prepared "
            f"statements off: {setting}"
        )
    if any(h.role == "standby" for h in result.hosts) and "target_session_attrs" not in url.query:
        standbys = ", ".join(h.label for h in result.hosts if h.role == "standby")
        out.append(
            f"{standbys}: standby (read-only); writes will fail there. List the primary first "
            "or set target_session_attrs=read-write"
        )
    return out
