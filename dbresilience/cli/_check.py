"""``dbresilience check URL``: can this URL reach its database, and how safely is it set up?

For each host of the URL (``host=a,b``, ``?host=a:5432&host=b:5433`` and ``?host=a,b&port=1,2``
multi-host forms too) the check resolves the name, opens a TCP connection, then logs in with
psycopg to learn whether TLS is in use, whether authentication succeeds, the server version,
whether the server is a primary or a standby, and the round trip of ``select 1``. It also shows
the timeout settings :func:`~dbresilience.create_resilient_engine` would use for this URL and
warns about risky ones. Every network step is bounded by ``timeout`` seconds; the password
never appears in the output.

This module probes (and has no dependency on rich: ``--json`` works without it);
:mod:`._check_advice` derives the effective settings and the warnings, :mod:`._check_render`
draws the tables.

Exit codes: 0 when every host is reachable and authentication succeeds, 1 otherwise, 2 for a
malformed URL.
"""

from __future__ import annotations

import ipaddress
import json
import math
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

from sqlalchemy.engine import URL

from dbresilience._classification import ErrorKind, classify
from dbresilience._engine import parse_url, url_hosts
from dbresilience._errors import ConfigurationError
from dbresilience._redaction import mask_url, redact
from dbresilience.cli._check_advice import (
    ASYNCPG_SSL,
    effective_settings,
    query_value,
    warnings_for,
)

__all__ = ["CheckResult", "HostCheck", "Setting", "exit_code", "print_json", "run_check"]

_T = TypeVar("_T")
Role = Literal["primary", "standby"]
HostKind = Literal["tcp", "unix", "default"]

_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
# Options the check sets itself per host, or that would make it skip hosts.
_OWN_OPTIONS = frozenset(
    {"host", "hostaddr", "port", "connect_timeout", "target_session_attrs", "load_balance_hosts"}
)
_MAX_MESSAGE = 200


@dataclass(slots=True)
class HostCheck:
    """What the check found for one host; ``None`` where a step was not reached.

    :ivar kind: ``tcp``, ``unix`` (a socket directory) or ``default`` (no host in the URL:
        libpq's default, ``PGHOST`` or the local socket).
    :ivar addresses: what the name resolved to.
    :ivar tcp_latency: seconds to open the TCP connection to ``tcp_address``.
    :ivar tls: TLS in use on the psycopg connection.
    :ivar auth: ``ok``, ``failed``, or ``None`` when the server was not reached.
    :ivar latency: round trip of ``select 1`` in seconds.
    :ivar pooler: a connection pooler answered (PgBouncer...): the backend pid given at login
        is not the one the server reports (``pg_backend_pid()``).
    :ivar error: the first failure, ``"<kind>: <message>"`` (kind from :func:`classify` or
        ``timeout``), password-free.
    """

    host: str | None
    port: int
    kind: HostKind = "tcp"
    addresses: list[str] = field(default_factory=list)
    dns_seconds: float | None = None
    tcp_address: str | None = None
    tcp_latency: float | None = None
    tls: bool | None = None
    auth: Literal["ok", "failed"] | None = None
    server_version: str | None = None
    role: Role | None = None
    latency: float | None = None
    pooler: bool | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Reached, authenticated and answering."""
        return self.error is None and self.auth == "ok"

    @property
    def label(self) -> str:
        """``host:port`` for people."""
        if self.kind == "default":
            return f"(libpq default host):{self.port}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def local(self) -> bool:
        """Traffic never leaves the machine: a Unix socket or loopback addresses only."""
        if self.kind != "tcp":
            return True
        if self.host and self.host.lower() in _LOCAL_NAMES:
            return True
        return bool(self.addresses) and all(_loopback(a) for a in self.addresses)


@dataclass(frozen=True, slots=True)
class Setting:
    """One network setting of the resilient engine: ``value`` from the URL or the Policy."""

    name: str
    value: str
    unit: str
    source: Literal["url", "policy"]


@dataclass(slots=True)
class CheckResult:
    """The whole check: the masked URL, every host, effective settings and warnings."""

    url: str
    driver: str
    timeout: float
    hosts: list[HostCheck]
    settings: list[Setting]
    warnings: list[str]
    #: What a resilient engine on the URL saw over a few statements (the typed
    #: ``get_stats()`` snapshot as a dict: pool state, counters); None when not reached.
    engine: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        """Every host reachable and authenticated."""
        return bool(self.hosts) and all(h.ok for h in self.hosts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with ``ok`` added at the top and per host."""
        out = asdict(self)
        out["ok"] = self.ok
        for host, data in zip(self.hosts, out["hosts"], strict=True):
            data["ok"] = host.ok
            data["label"] = host.label
        return out


def exit_code(result: CheckResult) -> int:
    """0 when every host is reachable and authenticated, else 1."""
    return 0 if result.ok else 1


# -- helpers ---------------------------------------------------------------------------------


def _shown(url: URL) -> str:
    """``url`` for output: password masked, also a ``password=...`` in the query."""
    return redact(mask_url(url))


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _describe(exc: BaseException) -> str:
    """``"<kind>: <first line of the message>"``, redacted and shortened."""
    timed_out = isinstance(exc, (FutureTimeout, TimeoutError))  # socket.timeout too
    kind = "timeout" if timed_out else classify(exc).kind.value
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    message = lines[0] if lines else type(exc).__name__
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    return f"{kind}: {redact(message)}"


def _bounded(fn: Callable[[], _T], timeout: float) -> _T:
    """Run ``fn`` in a daemon thread; raise ``TimeoutError`` if it takes over ``timeout`` s.

    A timed-out call keeps running in its thread until it returns by itself (bounded by the
    driver's own timeouts); a daemon thread never holds up the process's exit.
    """
    future: Future[_T] = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="dbresilience-check", daemon=True).start()
    try:
        return future.result(timeout)
    except FutureTimeout:
        raise TimeoutError(f"no answer within {timeout:g} s") from None


def hosts_of(url: URL) -> list[HostCheck]:
    """Every host the URL names, with its port (``ConfigurationError`` if inconsistent)."""
    named = url_hosts(url)
    if named[0][0] is None:
        return [HostCheck(host=None, port=named[0][1], kind="default")]
    return [
        HostCheck(host=host, port=port, kind="unix" if host[0] == "/" else "tcp")
        for host, port in named
        if host is not None
    ]


def _libpq_options() -> frozenset[str]:
    from psycopg import pq

    return frozenset(o.keyword.decode() for o in pq.Conninfo.get_defaults())


def _connect_options(url: URL, driver: str) -> tuple[dict[str, str], list[str]]:
    """libpq options from the URL's query for the check, and the names it had to ignore."""
    known = _libpq_options()
    options: dict[str, str] = {}
    ignored: list[str] = []
    for name in url.query:
        value = query_value(url, name)
        if value is None or name in _OWN_OPTIONS:
            continue
        if driver == "asyncpg" and name == "ssl":
            options["sslmode"] = ASYNCPG_SSL.get(value.lower(), value)
        elif name in known:
            options[name] = value
        else:
            ignored.append(name)
    return options, ignored


# -- the steps -------------------------------------------------------------------------------


def _resolve(check: HostCheck, timeout: float) -> list[tuple[int, Any]]:
    assert check.host is not None
    host, port = check.host, check.port
    started = time.perf_counter()
    infos = _bounded(lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
    check.dns_seconds = time.perf_counter() - started
    targets: list[tuple[int, Any]] = []
    for family, _, _, _, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in check.addresses:
            check.addresses.append(address)
            targets.append((int(family), sockaddr))
    return targets


def _tcp_connect(check: HostCheck, targets: list[tuple[int, Any]], timeout: float) -> None:
    """Connect to the addresses in turn until one accepts; ``timeout`` bounds them all."""
    deadline = time.monotonic() + timeout
    error: OSError | None = None
    for family, sockaddr in targets:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no TCP connection within {timeout:g} s")
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(remaining)
            started = time.perf_counter()
            try:
                sock.connect(sockaddr)
            except OSError as exc:
                error = exc
                continue
            check.tcp_latency = time.perf_counter() - started
            check.tcp_address = str(sockaddr[0])
            return
    assert error is not None  # getaddrinfo returns at least one address or raises
    raise error


def _login(
    check: HostCheck, url: URL, options: dict[str, str], timeout: float
) -> tuple[bool, str | None, bool, float, bool]:
    import psycopg

    params: dict[str, Any] = {
        **options,
        "port": check.port,
        "connect_timeout": max(2, math.ceil(timeout)),  # libpq's minimum is 2 s
    }
    given = {
        "user": url.username,
        "password": url.password,
        "dbname": url.database,
        "host": check.host,
        "hostaddr": check.tcp_address,  # the address the TCP step reached
    }
    params.update({k: v for k, v in given.items() if v is not None})
    with psycopg.connect(autocommit=True, **params) as conn:
        tls = bool(conn.pgconn.ssl_in_use)
        version = conn.info.parameter_status("server_version")
        row = conn.execute("select pg_is_in_recovery(), pg_backend_pid()").fetchone()
        started = time.perf_counter()
        conn.execute("select 1").fetchone()
        latency = time.perf_counter() - started
        # A pooler gives the client a backend key of its own at login.
        pooler = row is not None and int(row[1]) != conn.info.backend_pid
    return tls, version, bool(row and row[0]), latency, pooler


def _auth_failed(exc: BaseException, message: str) -> bool:
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate.startswith("28"):
        return True
    lowered = message.lower()
    return (
        "authentication failed" in lowered
        or "no password supplied" in lowered
        or "no pg_hba.conf entry" in lowered
        or ("role" in lowered and "does not exist" in lowered)
    )


def _check_host(check: HostCheck, url: URL, options: dict[str, str], timeout: float) -> None:
    if check.kind == "tcp":
        try:
            targets = _resolve(check, timeout)
        except Exception as exc:
            check.error = f"dns: {_describe(exc)}"
            return
        try:
            _tcp_connect(check, targets, timeout)
        except Exception as exc:
            check.error = _describe(exc)
            return
    try:
        tls, version, standby, latency, pooler = _bounded(
            lambda: _login(check, url, options, timeout), timeout
        )
    except Exception as exc:
        check.error = _describe(exc)
        if _auth_failed(exc, check.error):
            check.auth = "failed"
        elif classify(exc).kind is ErrorKind.PERMANENT and "does not exist" in check.error:
            check.auth = "ok"  # the server checks the database after authenticating
        return
    check.auth = "ok"
    check.tls = tls
    check.server_version = version
    check.role = "standby" if standby else "primary"
    check.latency = latency
    check.pooler = pooler


def run_check(url: str | URL, *, timeout: float = 5.0) -> CheckResult:
    """Check every host of ``url``; each network step is bounded by ``timeout`` seconds.

    Raises :class:`ConfigurationError` (password masked) for a malformed or non-PostgreSQL URL;
    network and server failures are reported in the result, never raised.
    """
    parsed = parse_url(url)
    backend = parsed.get_backend_name()
    if backend != "postgresql":
        raise ConfigurationError(
            f"dbresilience supports PostgreSQL only, not {backend!r} (URL {_shown(parsed)})"
        )
    driver = parsed.get_driver_name() if "+" in parsed.drivername else "psycopg"
    try:
        hosts = hosts_of(parsed)
    except ConfigurationError as exc:
        raise ConfigurationError(f"malformed database URL {_shown(parsed)}: {exc}") from None
    options, ignored = _connect_options(parsed, driver)
    result = CheckResult(
        url=_shown(parsed),
        driver=driver,
        timeout=timeout,
        hosts=hosts,
        settings=effective_settings(parsed),
        warnings=[],
    )
    for check in hosts:
        _check_host(check, parsed, options, timeout)
    result.warnings = warnings_for(parsed, driver, result, ignored)
    if result.ok:
        try:
            result.engine = _bounded(lambda: _through_engine(parsed), 3 * timeout)
        except Exception as exc:
            result.warnings.append(f"a resilient engine could not run statements: {_describe(exc)}")
    return result


_ENGINE_STATEMENTS = 3


def _through_engine(url: URL) -> dict[str, Any]:
    """Run a few statements through a resilient engine (psycopg: a sync engine, whatever
    the URL's driver); its ``get_stats()`` snapshot as a dict."""
    from sqlalchemy import text

    from dbresilience import create_resilient_engine, get_stats

    engine = create_resilient_engine(url.set(drivername="postgresql+psycopg"))
    try:
        for _ in range(_ENGINE_STATEMENTS):
            with engine.connect() as conn:
                conn.execute(text("select 1"))
        stats = get_stats(engine)
    finally:
        engine.dispose()
    out = asdict(stats)
    out["counters"] = dict(stats.counters)
    out["engine"] = mask_url(url)
    return out


# -- machine-readable output (no rich needed) --------------------------------------------


def print_json(result: CheckResult) -> None:
    """One JSON document on stdout."""
    print(json.dumps(result.to_dict(), indent=2))
