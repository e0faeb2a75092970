"""dbresilience: connection resilience for SQLAlchemy 2.x over PostgreSQL.

Swap ``create_engine(...)`` for :func:`create_resilient_engine` (asyncio:
``create_async_engine(...)`` for :func:`create_async_resilient_engine`) and the application
survives server restarts, killed backends, reset sockets and overload without code changes.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from dbresilience._classification import Classification, ErrorKind, classify
from dbresilience._engine import create_async_resilient_engine, create_resilient_engine
from dbresilience._engine_hooks import IDEMPOTENT_OPTION, get_stats, install
from dbresilience._errors import (
    CircuitOpen,
    CommitOutcomeUnknown,
    ConfigurationError,
    DatabaseUnavailable,
    DisconnectError,
    PermanentError,
    ResilienceError,
    ResourceExhausted,
    StatementTimeout,
    TransactionConflict,
)
from dbresilience._events import (
    BreakerTransition,
    CommitResolved,
    ConnectFailure,
    Disconnect,
    Event,
    EventHook,
    HangAbort,
    Invalidation,
    Replay,
    RetryDetails,
    StatementTimedOut,
)
from dbresilience._health import HealthReport, PoolCounts, check_health, check_health_async
from dbresilience._observability import (
    RetryHook,
    Stats,
    add_event_hook,
    add_hook,
    remove_event_hook,
    remove_hook,
)
from dbresilience._policy import Policy
from dbresilience._retrying import set_testing
from dbresilience._stats import CommitCounts, EngineStats, PoolStats, RetryCounts
from dbresilience._transactions import run_transaction, transactional

if TYPE_CHECKING:
    from dbresilience._async_transactions import async_session_factory, run_async_transaction
    from dbresilience._exporters._otel import instrument_opentelemetry
    from dbresilience._exporters._prometheus import register_prometheus

_LAZY = {"async_session_factory", "run_async_transaction"}
# The exporters import their library: only when the application asks for one.
_EXPORTERS = {
    "instrument_opentelemetry": ("_otel", "opentelemetry", "otel"),
    "register_prometheus": ("_prometheus", "prometheus_client", "prometheus"),
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTERS:
        module, library, extra = _EXPORTERS[name]
        if importlib.util.find_spec(library) is None:
            raise ImportError(
                f"dbresilience.{name} needs {library}: pip install 'dbresilience[{extra}]'"
            )
        exporter = importlib.import_module(f"dbresilience._exporters.{module}")
        return getattr(exporter, name)
    # The asyncio API needs greenlet (sqlalchemy[asyncio]), which the sync extras do not
    # install: load it on first use so that `import dbresilience` works without it.
    if name in _LAZY:
        # SQLAlchemy 2.0 imports its asyncio extension without greenlet, and fails later.
        try:
            missing = importlib.util.find_spec("greenlet") is None
        except ImportError:
            missing = True
        if missing:
            raise ImportError(
                f"dbresilience.{name} needs greenlet: pip install 'sqlalchemy[asyncio]' "
                "(or dbresilience[asyncpg])"
            )
        from dbresilience import _async_transactions

        return getattr(_async_transactions, name)
    raise AttributeError(f"module 'dbresilience' has no attribute {name!r}")

__all__ = [
    "IDEMPOTENT_OPTION",
    "BreakerTransition",
    "CircuitOpen",
    "Classification",
    "CommitCounts",
    "CommitOutcomeUnknown",
    "CommitResolved",
    "ConfigurationError",
    "ConnectFailure",
    "DatabaseUnavailable",
    "Disconnect",
    "DisconnectError",
    "EngineStats",
    "ErrorKind",
    "Event",
    "EventHook",
    "HangAbort",
    "HealthReport",
    "Invalidation",
    "PermanentError",
    "Policy",
    "PoolCounts",
    "PoolStats",
    "Replay",
    "ResilienceError",
    "ResourceExhausted",
    "RetryCounts",
    "RetryDetails",
    "RetryHook",
    "StatementTimedOut",
    "StatementTimeout",
    "Stats",
    "TransactionConflict",
    "add_event_hook",
    "add_hook",
    "async_session_factory",
    "check_health",
    "check_health_async",
    "classify",
    "create_async_resilient_engine",
    "create_resilient_engine",
    "get_stats",
    "install",
    "instrument_opentelemetry",
    "register_prometheus",
    "remove_event_hook",
    "remove_hook",
    "run_async_transaction",
    "run_transaction",
    "set_testing",
    "transactional",
]
