"""Installing dbresilience on an engine, and finding it again: the registry.

:func:`install` puts the hooks of :mod:`dbresilience._hooks` on one engine (its events,
pool and dialect), each concern in its own module:

* :mod:`~dbresilience._hooks.connect` - ``do_connect`` (network defaults) and the pool's
  creator (connect retries, the circuit breaker);
* :mod:`~dbresilience._hooks.liveness` - the pool's ``_do_get`` (stale-connection checks);
* :mod:`~dbresilience._hooks.statements` - the dialect's ``do_execute*`` (the watchdog bound,
  first-statement replay);
* :mod:`~dbresilience._hooks.commit` - ``do_commit`` (verification) and ``do_rollback``;
* :mod:`~dbresilience._hooks.errors` - ``handle_error`` (classification).

The hot paths are wrapped rather than listened to where SQLAlchemy's event dispatch would cost
as much as the work itself (see the README's happy-path cost). The state is keyed by the
engine's dialect, which ``engine.execution_options(...)`` engines share with it.
"""

from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.engine.interfaces import Dialect

from dbresilience._drivers import driver_for
from dbresilience._errors import ConfigurationError
from dbresilience._hooks._state import EngineResilience
from dbresilience._hooks.commit import install_commit_and_rollback
from dbresilience._hooks.connect import Connector
from dbresilience._hooks.errors import ErrorHook
from dbresilience._hooks.hangs import HangMonitor
from dbresilience._hooks.liveness import Liveness
from dbresilience._hooks.statements import IDEMPOTENT_OPTION, StatementGuard
from dbresilience._policy import Policy
from dbresilience._redaction import mask_url
from dbresilience._sqla import check_version
from dbresilience._stats import EngineStats, pool_stats

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["IDEMPOTENT_OPTION", "EngineResilience", "get_stats", "install", "resilience_of"]

_installed: weakref.WeakKeyDictionary[Dialect, EngineResilience] = weakref.WeakKeyDictionary()


def _after_fork_in_child() -> None:
    for state in list(_installed.values()):
        state.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _check_engine(engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        raise ConfigurationError(
            f"dbresilience supports PostgreSQL only, not {engine.dialect.name!r} "
            f"(engine {mask_url(engine.url)})"
        )
    driver_for(engine.dialect.driver)  # ValueError naming the driver if unsupported


def _sync_engine(engine: Engine | AsyncEngine) -> Engine:
    # Duck-typed so that importing dbresilience never needs sqlalchemy.ext.asyncio (greenlet).
    sync: Engine = getattr(engine, "sync_engine", None) or engine  # type: ignore[assignment]
    return sync


def install(engine: Engine | AsyncEngine, policy: Policy | None = None) -> EngineResilience:
    """Make an existing engine resilient; return its :class:`EngineResilience` state.

    Installing twice on the same engine raises :class:`ConfigurationError`.
    """
    check_version()
    sync_engine = _sync_engine(engine)
    if not isinstance(sync_engine, Engine):
        raise ConfigurationError(f"install() needs an Engine or AsyncEngine, got {engine!r}")
    _check_engine(sync_engine)
    if sync_engine.dialect in _installed:
        raise ConfigurationError(
            f"dbresilience is already installed on {mask_url(sync_engine.url)}"
        )
    if policy is not None and not isinstance(policy, Policy):
        raise ConfigurationError(f"policy must be a dbresilience.Policy, got {policy!r}")
    state = EngineResilience(sync_engine, policy or Policy())
    connector = Connector(state)
    connector.install(sync_engine)
    event.listen(sync_engine, "handle_error", ErrorHook(state))
    StatementGuard(state).install(sync_engine.dialect)
    Liveness(state, connector).hook_pool(sync_engine.pool)
    install_commit_and_rollback(state, sync_engine)
    if state.policy.hang_threshold and state.call_bound:
        state.monitor = HangMonitor(state, sync_engine)
        state.monitor.install(sync_engine)
    _installed[sync_engine.dialect] = state
    return state


def resilience_of(engine: Engine | AsyncEngine) -> EngineResilience:
    """The :class:`EngineResilience` of a resilient engine; ``ConfigurationError`` if none."""
    sync_engine = _sync_engine(engine)
    try:
        return _installed[sync_engine.dialect]
    except KeyError:
        raise ConfigurationError(
            f"{mask_url(sync_engine.url)} is not a resilient engine: "
            "use create_resilient_engine() or install()"
        ) from None


def get_stats(engine: Engine | AsyncEngine) -> EngineStats:
    """What a resilient engine did (retries, replays, lost COMMITs... by type) and its pool's
    state now: a typed, immutable :class:`~dbresilience.EngineStats` snapshot."""
    state = resilience_of(engine)
    sync_engine = _sync_engine(engine)
    counts = state.stats.snapshot()
    pool = pool_stats(
        sync_engine.pool, waiting=len(state.pending), timeouts=counts.get("pool.timeouts", 0)
    )
    breaker = None if state.breaker is None else state.breaker.state
    return EngineStats.build(state.name, counts, pool, breaker)
