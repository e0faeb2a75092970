"""``dbresilience check URL``: can this URL reach its database, and how safely is it set up?

For each host of the URL (``host=a,b``, ``?host=a:5432&host=b:5433`` and ``?host=a,b&port=1,2``
multi-host forms too) the check resolves the name, opens a TCP connection, then logs in with
psycopg to learn whether TLS is in use, whether authentication succeeds, the server version,
whether the server is a primary or a standby, and the round trip of ``select 1``. It also shows
the timeout settings :func:`~dbresilience.create_resilient_engine` would use for this URL and
warns about risky ones. Every network step is bounded by ``timeout`` seconds; the password
never appears in the output.

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

from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import URL

from dbresilience._classification import ErrorKind, classify
from dbresilience._drivers import driver_for
from dbresilience._engine import ASYNC_DRIVERS, SYNC_DRIVERS, parse_url
from dbresilience._errors import ConfigurationError
from dbresilience._policy import Policy
from dbresilience._redaction import mask_url, redact

__all__ = ["CheckResult", "HostCheck", "Setting", "exit_code", "print_result", "run_check"]

_T = TypeVar("_T")
Role = Literal["primary", "standby"]
HostKind = Literal["tcp", "unix", "default"]

DEFAULT_PORT = 5432
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
_NETWORK_OPTIONS = (
    ("connect_timeout", "s"),
    ("keepalives", ""),
    ("keepalives_idle", "s"),
    ("keepalives_interval", "s"),
    ("keepalives_count", ""),
    ("tcp_user_timeout", "ms"),
)
# Options the check sets itself per host, or that would make it skip hosts.
_OWN_OPTIONS = frozenset(
    {"host", "hostaddr", "port", "connect_timeout", "target_session_attrs", "load_balance_hosts"}
)
_ASYNCPG_SSL = {"true": "require", "false": "disable"}
_MAX_CONNECT_TIMEOUT = 30  # seconds; more in the URL is flagged as over-large
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


def hosts_of(url: URL) -> list[HostCheck]:
    """Every host the URL names, with its port (``ConfigurationError`` if inconsistent)."""
    query = url.query
    items = _as_list(url.host) + _as_list(query.get("host"))
    ports = [_port(p) for p in _as_list(query.get("port"))]
    default = url.port or (ports[0] if len(ports) == 1 else DEFAULT_PORT)
    if not items:
        return [HostCheck(host=None, port=default, kind="default")]
    if len(ports) > 1 and len(ports) != len(items):
        raise ConfigurationError(f"{len(items)} hosts but {len(ports)} ports")
    checks = []
    for i, item in enumerate(items):
        host, port = _split_host_port(item)
        if port is None:
            port = ports[i] if len(ports) > 1 else default
        checks.append(HostCheck(host=host, port=port, kind="unix" if host[0] == "/" else "tcp"))
    return checks


def _query_value(url: URL, name: str) -> str | None:
    value = url.query.get(name)
    if value is None:
        return None
    return value if isinstance(value, str) else value[-1]


def _libpq_options() -> frozenset[str]:
    from psycopg import pq

    return frozenset(o.keyword.decode() for o in pq.Conninfo.get_defaults())


def _connect_options(url: URL, driver: str) -> tuple[dict[str, str], list[str]]:
    """libpq options from the URL's query for the check, and the names it had to ignore."""
    known = _libpq_options()
    options: dict[str, str] = {}
    ignored: list[str] = []
    for name in url.query:
        value = _query_value(url, name)
        if value is None or name in _OWN_OPTIONS:
            continue
        if driver == "asyncpg" and name == "ssl":
            options["sslmode"] = _ASYNCPG_SSL.get(value.lower(), value)
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
) -> tuple[bool, str | None, bool, float]:
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
        row = conn.execute("select pg_is_in_recovery()").fetchone()
        started = time.perf_counter()
        conn.execute("select 1").fetchone()
        latency = time.perf_counter() - started
    return tls, version, bool(row and row[0]), latency


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
        tls, version, standby, latency = _bounded(
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


def effective_settings(url: URL) -> list[Setting]:
    """Network settings a resilient engine uses for ``url``: the URL's own, else Policy's."""
    from_url = {name: _query_value(url, name) for name, _ in _NETWORK_OPTIONS}
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


def _warnings(url: URL, driver: str, result: CheckResult, ignored: list[str]) -> list[str]:
    out: list[str] = []
    if driver not in SYNC_DRIVERS + ASYNC_DRIVERS:
        out.append(
            f"driver {driver!r} is not supported by dbresilience: use postgresql+psycopg:// "
            "or postgresql+asyncpg:// (this check used psycopg)"
        )
    out.extend(
        f"URL option {name!r} is not a libpq option; this check ignored it" for name in ignored
    )
    sslmode = (_query_value(url, "sslmode") or "").lower()
    if driver == "asyncpg" and "ssl" in url.query:
        sslmode = _ASYNCPG_SSL.get((_query_value(url, "ssl") or "").lower(), "")
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
    if _query_value(url, "keepalives") == "0":
        out.append(
            "keepalives=0 in the URL: a connection whose peer vanished silently is noticed only "
            "when the kernel gives up retransmitting (many minutes)"
        )
    if _query_value(url, "tcp_user_timeout") == "0":
        out.append("tcp_user_timeout=0 in the URL: unacknowledged data may wait for minutes")
    default_timeout = Policy().connect_timeout
    connect_timeout = _query_value(url, "connect_timeout")
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
    if any(h.role == "standby" for h in result.hosts) and "target_session_attrs" not in url.query:
        standbys = ", ".join(h.label for h in result.hosts if h.role == "standby")
        out.append(
            f"{standbys}: standby (read-only); writes will fail there. List the primary first "
            "or set target_session_attrs=read-write"
        )
    return out


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
    result.warnings = _warnings(parsed, driver, result, ignored)
    return result


# -- output ----------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000:.2f} ms"


def _status(ok: bool | None) -> Text:
    if ok is None:
        return Text("-", style="dim")
    return Text("ok", style="green") if ok else Text("failed", style="bold red")


def _host_table(check: HostCheck) -> Table:
    table = Table(title=Text(check.label, style="bold"), title_justify="left", expand=False)
    table.add_column("step")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    if check.kind == "tcp":
        failed_dns = bool(check.error and check.error.startswith("dns:"))
        dns_ok = False if failed_dns else True if check.addresses else None
        dns_detail = f"{', '.join(check.addresses)} ({_ms(check.dns_seconds)})"
        table.add_row("DNS", _status(dns_ok), dns_detail if check.addresses else "")
        tcp_ok = True if check.tcp_address else False if check.addresses else None
        tcp_detail = f"{check.tcp_address} in {_ms(check.tcp_latency)}" if tcp_ok else ""
        table.add_row("TCP", _status(tcp_ok), tcp_detail)
    else:
        where = check.host if check.kind == "unix" else "PGHOST or the local socket"
        table.add_row("socket", _status(None), where or "")
    tls = "-" if check.tls is None else "on" if check.tls else "off"
    table.add_row("TLS", Text(tls, style="green" if check.tls else "yellow"), "")
    table.add_row("auth", _status(None if check.auth is None else check.auth == "ok"), "")
    if check.server_version is not None:
        table.add_row("server", _status(True), f"PostgreSQL {check.server_version}, {check.role}")
    if check.latency is not None:
        table.add_row("select 1", _status(True), _ms(check.latency))
    if check.error is not None:
        table.add_row("error", _status(False), check.error)
    return table


def print_result(result: CheckResult, console: Console) -> None:
    """Tables per host, the effective settings and warnings, for people."""
    console.print(Text(f"dbresilience check {result.url}", style="bold"))
    for check in result.hosts:
        console.print(_host_table(check))
    settings = Table(
        title=Text("network settings of create_resilient_engine()", style="bold"),
        title_justify="left",
    )
    settings.add_column("setting")
    settings.add_column("value", justify="right")
    settings.add_column("from")
    for s in result.settings:
        value = f"{s.value} {s.unit}".strip()
        settings.add_row(s.name, value, "URL" if s.source == "url" else "Policy default")
    console.print(settings)
    for warning in result.warnings:
        console.print(Text.assemble(("warning: ", "bold yellow"), warning))
    if result.ok:
        console.print(Text("OK: every host reachable and authenticated", style="bold green"))
    else:
        console.print(Text("FAILED: see the errors above", style="bold red"))


def print_json(result: CheckResult) -> None:
    """One JSON document on stdout."""
    print(json.dumps(result.to_dict(), indent=2))
