"""``dbresilience check``: the result drawn as rich tables (``--json`` does not need this)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from dbresilience.cli._check import CheckResult, HostCheck

__all__ = ["print_result"]


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
        server = f"PostgreSQL {check.server_version}, {check.role}"
        if check.pooler:
            server += ", through a connection pooler"
        table.add_row("server", _status(True), server)
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
    if result.engine is not None:
        console.print(_engine_table(result.engine))
    for warning in result.warnings:
        console.print(Text.assemble(("warning: ", "bold yellow"), warning))
    if result.ok:
        console.print(Text("OK: every host reachable and authenticated", style="bold green"))
    else:
        console.print(Text("FAILED: see the errors above", style="bold red"))


def _engine_table(stats: dict[str, Any]) -> Table:
    """What a resilient engine saw over the check's statements: get_stats()."""
    table = Table(
        title=Text("a resilient engine on this URL: get_stats()", style="bold"),
        title_justify="left",
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    pool = stats["pool"]
    table.add_row("pool: size / max", f"{pool['size']} / {pool['max']}")
    in_use = f"{pool['idle']} / {pool['checked_out']} / {pool['waiting']}"
    table.add_row("pool: idle / in use / waiting", in_use)
    r = stats["retries"]
    retries = f"{r['connect']} / {r['statement']} / {r['transaction']}"
    table.add_row("retries: connect / statement / transaction", retries)
    table.add_row("connect failures", str(stats["connect_failures"]))
    table.add_row("lost connections / replays", f"{stats['disconnects']} / {stats['replays']}")
    table.add_row("circuit breaker", str(stats["breaker"]))
    return table
