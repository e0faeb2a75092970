"""Timings of connections and statements, measured only on engines that export them.

:func:`attach` adds a :class:`Recorder` to an engine. The first one installs the timing
wrappers - around the pool's ``_do_get`` (wait) and ``_do_return_conn`` (use), the pool's
creator (create, measured by the connect hook) and the dialect's ``do_execute*`` (operation
duration, replays included) - so an engine nobody exports pays nothing for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy.engine import Engine
from sqlalchemy.pool import ConnectionPoolEntry, Pool

from dbresilience import _sqla
from dbresilience._hooks._state import EngineResilience

__all__ = ["Recorder", "attach", "detach"]

_CHECKED_OUT_AT = "dbresilience_checked_out_at"
_monotonic = time.monotonic


class Recorder(Protocol):
    """Receives timings, in seconds; called on the app's threads: quick, must not raise.

    :ivar timings: which it wants: ``"wait"``, ``"use"``, ``"create"``, ``"operation"``.
    """

    timings: tuple[str, ...]

    def connection_created(self, seconds: float) -> None:
        """A new connection was made (connect retries included)."""

    def connection_waited(self, seconds: float) -> None:
        """A checkout got its connection (waiting for a free one, or making one)."""

    def connection_used(self, seconds: float) -> None:
        """A connection came back to the pool after being checked out this long."""

    def operation(self, seconds: float, error: BaseException | None) -> None:
        """A statement finished (``error``: what it raised, replays included)."""


def attach(state: EngineResilience, engine: Engine, recorder: Recorder) -> None:
    """Send ``engine``'s timings to ``recorder`` too: those it names in its ``timings``
    (``"wait"``, ``"use"``, ``"create"``, ``"operation"``; the wrappers a timing needs are
    installed the first time a recorder wants it)."""
    wanted = set(recorder.timings)
    unknown = wanted - set(_KINDS)
    if unknown:
        raise ValueError(f"unknown timings {sorted(unknown)}: choose from {list(_KINDS)}")
    timers: dict[str, tuple[Recorder, ...]] = dict(state.recorders or {})
    new = wanted - set(timers)
    if new & {"wait", "use"} and not set(timers) & {"wait", "use"}:
        _time_pool(state, engine.pool)  # the checkout: its wait, and the use's start
    if "use" in new:
        _time_returns(state, engine.pool)
    if "operation" in new:
        _time_statements(state, engine)
    # ("create" is measured by the connect hook, dbresilience._hooks.connect, when wanted.)
    for kind in _KINDS:
        if kind in wanted:
            timers[kind] = (*timers.get(kind, ()), recorder)
    state.recorders = timers


def detach(state: EngineResilience, recorder: Recorder) -> None:
    """Stop sending timings to ``recorder`` (the wrappers stay, calling nobody)."""
    timers: dict[str, tuple[Recorder, ...]] = dict(state.recorders or {})
    state.recorders = {k: tuple(r for r in v if r is not recorder) for k, v in timers.items()}


def _time_pool(state: EngineResilience, pool: Pool) -> None:
    """Wrap the pool's ``_do_get``: the wait, and the checkout time the use is measured from
    (not a ``checkout`` listener: with one, every checkout would also get a socket check, see
    :mod:`dbresilience._hooks.liveness`)."""

    def timed(get: Callable[[], ConnectionPoolEntry]) -> ConnectionPoolEntry:
        start = _monotonic()
        record = get()
        now = _monotonic()
        timers = state.recorders
        if timers.get("use"):
            info: dict[Any, Any] = record.record_info  # type: ignore[assignment]
            info[_CHECKED_OUT_AT] = now
        for recorder in timers.get("wait", ()):
            recorder.connection_waited(now - start)
        return record

    _sqla.wrap_do_get(pool, timed)
    _sqla.on_recreate(pool, lambda new: _time_pool(state, new))


def _time_returns(state: EngineResilience, pool: Pool) -> None:
    """Wrap the pool's ``_do_return_conn`` (not a ``checkin`` listener: SQLAlchemy's event
    dispatch would cost as much as the measurement)."""

    def returned(put: Callable[[ConnectionPoolEntry], None], record: ConnectionPoolEntry) -> None:
        info: dict[Any, Any] | None = record.record_info
        started = None if info is None else info.pop(_CHECKED_OUT_AT, None)
        if started is not None:
            used = _monotonic() - started
            for recorder in state.recorders["use"]:
                recorder.connection_used(used)
        put(record)

    _sqla.wrap_do_return_conn(pool, returned)
    _sqla.on_recreate(pool, lambda new: _time_returns(state, new))


def _time_statements(state: EngineResilience, engine: Engine) -> None:
    """Time the dialect's ``do_execute*`` (outside the statement guard: replays included)."""
    dialect = engine.dialect

    def timing(original: Callable[..., None]) -> Callable[..., None]:
        def timed(*args: Any, **kwargs: Any) -> None:
            start = _monotonic()
            try:
                original(*args, **kwargs)
            except BaseException as exc:
                elapsed = _monotonic() - start
                for recorder in state.recorders["operation"]:
                    recorder.operation(elapsed, exc)
                raise
            elapsed = _monotonic() - start
            for recorder in state.recorders["operation"]:
                recorder.operation(elapsed, None)

        return timed

    dialect.do_execute = timing(dialect.do_execute)  # type: ignore[method-assign]
    dialect.do_executemany = timing(dialect.do_executemany)  # type: ignore[method-assign]
    dialect.do_execute_no_params = timing(  # type: ignore[method-assign]
        dialect.do_execute_no_params
    )


_KINDS = ("wait", "use", "create", "operation")
