"""The ``dbresilience`` command line.

Each subcommand is one ``_add_<name>`` function registering its parser (with a ``handler``
default) in :data:`_SUBCOMMANDS`; the handler takes the parsed arguments and returns the exit
code.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeAlias

__all__ = ["build_parser", "main"]

if TYPE_CHECKING:
    _Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 1.0 <= number <= 600.0:
        raise argparse.ArgumentTypeError(f"must be between 1 and 600 seconds, got {value}")
    return number


# -- demo ------------------------------------------------------------------------------------


def _run_demo(args: argparse.Namespace) -> int:
    needed = ["rich", "psycopg"] + (["asyncpg", "greenlet"] if args.driver == "asyncpg" else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"dbresilience demo needs {', '.join(missing)}: pip install 'dbresilience[demo]'",
            file=sys.stderr,
        )
        return 1
    if args.url is None:
        from dbresilience.testing import find_pg_bindir

        try:
            find_pg_bindir()
        except RuntimeError as exc:
            print(
                f"dbresilience demo: {exc} (or pass --url for a server of yours)", file=sys.stderr
            )
            return 1

    from pathlib import Path

    from rich.console import Console

    from dbresilience.cli import _demo, _demo_report, _demo_view

    console = Console()
    if not console.is_terminal:  # a log or a pipe: room for the tables' class names
        console = Console(width=max(console.width, 120))
    box: list[_demo.LiveState] = []
    try:
        with _demo_view.live_view(box, console):
            result = _demo.run_demo(
                scenario=args.scenario,
                driver=args.driver,
                threads=args.threads,
                duration=args.duration,
                url=args.url,
                compare=not args.no_compare,
                state_hook=box.append,
            )
    except _demo.DemoError as exc:
        print(f"dbresilience demo: {exc}", file=sys.stderr)
        return 1
    reports = _demo_report.write_reports(result, Path(args.out))
    _demo_view.print_result(result, console, reports)
    if "png" not in reports:
        console.print(
            "note: no PNG chart: matplotlib is missing (pip install 'dbresilience[demo]')"
        )
    return 0 if result.ok else 1


def _add_demo(subparsers: _Subparsers) -> None:
    from dbresilience.cli._demo import SCENARIOS

    parser = subparsers.add_parser(
        "demo",
        help="three engines side by side under injected faults: live view, then a report",
        description=(
            "Run one write workload at once through create_engine(), "
            "create_resilient_engine() with the code unchanged, and the resilient engine with "
            "run_transaction(), while faults are injected (a throwaway PostgreSQL server, or "
            "--url); show it live, then write report.json, report.png and report.html. "
            "Scenarios: " + "; ".join(f"{k}: {v}" for k, v in SCENARIOS.items()) + "."
        ),
    )
    parser.add_argument(
        "--scenario", choices=list(SCENARIOS), default="mixed", help="fault script (default: mixed)"
    )
    parser.add_argument(
        "--driver", choices=["psycopg", "asyncpg"], default="psycopg", help="(default: psycopg)"
    )
    parser.add_argument(
        "--duration",
        type=_seconds,
        default=45.0,
        help="seconds of workload, all engines at once (default: 45)",
    )
    parser.add_argument(
        "--threads", type=_positive_int, default=6, help="workers per engine (default: 6)"
    )
    parser.add_argument(
        "--url",
        help=(
            "your own server (SQLAlchemy URL) instead of a throwaway one: tables "
            "dbresilience_demo_* are created and dropped there; restarts and outages are "
            "skipped (they need control of the server)"
        ),
    )
    parser.add_argument(
        "--out",
        default="dbresilience-demo",
        metavar="DIR",
        help="directory for report.json, report.png, report.html (default: ./dbresilience-demo)",
    )
    parser.add_argument(
        "--no-compare", action="store_true", help="skip the plain create_engine() run"
    )
    parser.set_defaults(handler=_run_demo)


# -- check -----------------------------------------------------------------------------------

_URL_ENV = "DATABASE_URL"


def _run_check(args: argparse.Namespace) -> int:
    url: str | None = args.url or os.environ.get(_URL_ENV)
    if not url:
        print(
            f"dbresilience check: no URL: pass one or set {_URL_ENV} (keeps the password out of "
            "the shell history and the process list)",
            file=sys.stderr,
        )
        return 2
    needed = ("psycopg",) if args.json else ("rich", "psycopg")  # --json needs no rich
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"dbresilience check needs {', '.join(missing)}: pip install 'dbresilience[demo]'",
            file=sys.stderr,
        )
        return 1

    from dbresilience._errors import ConfigurationError
    from dbresilience.cli import _check

    try:
        result = _check.run_check(url, timeout=args.timeout)
    except ConfigurationError as exc:
        print(f"dbresilience check: {exc}", file=sys.stderr)  # masked by run_check
        return 2
    if args.json:
        _check.print_json(result)
    else:
        from rich.console import Console

        from dbresilience.cli._check_render import print_result

        print_result(result, Console(highlight=False))
    return _check.exit_code(result)


def _add_check(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "check",
        help="diagnose a database URL: DNS, TCP, TLS, auth, role, latency, timeout settings",
        description=(
            "For each host of URL: resolve it, open a TCP connection, log in with psycopg "
            "(TLS in use? authentication ok?), read the server version and role (primary or "
            "standby) and time a select 1. Shows the timeout settings create_resilient_engine() "
            "would use and warns about risky ones. Passwords are masked in all output. "
            "Exit code: 0 every host reachable and authenticated, 1 otherwise, 2 bad URL."
        ),
    )
    parser.add_argument(
        "url",
        nargs="?",
        metavar="URL",
        help=f"SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@host/db (default: ${_URL_ENV})",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=5.0,
        help="bound in seconds on each network step (default: 5)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(handler=_run_check)


# ---------------------------------------------------------------------------------------------

_SUBCOMMANDS: tuple[Callable[[_Subparsers], None], ...] = (_add_demo, _add_check)


def build_parser() -> argparse.ArgumentParser:
    """The ``dbresilience`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="dbresilience",
        description="Connection resilience for SQLAlchemy over PostgreSQL.",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    Usage errors return 2 and ``--help`` returns 0, without raising :class:`SystemExit`.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
