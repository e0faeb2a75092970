"""The typed snapshot :func:`~dbresilience.get_stats` returns: pool state and event counters.

Fields are stable (new ones may be added, none renamed); counts are totals since the engine
was made (in a forked child: since the fork, the parent's included). The raw counters behind
them, and a few finer ones, are in :attr:`EngineStats.counters` under the string keys listed
in :mod:`dbresilience._observability`; ``stats["retry.connect"]`` reads one (0 if never seen).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, overload

from sqlalchemy.pool import AssertionPool, QueuePool, StaticPool

from dbresilience import _sqla

__all__ = ["CommitCounts", "EngineStats", "PoolStats", "RetryCounts", "pool_stats"]

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class PoolStats:
    """The pool's state when the snapshot was taken (``QueuePool``; zeros for other pools).

    :ivar size: configured ``pool_size``: connections kept open when idle.
    :ivar max: most connections open at once (``pool_size + max_overflow``; 1 for
        ``StaticPool``; -1: no limit, e.g. ``NullPool``).
    :ivar idle: open connections waiting in the pool.
    :ivar checked_out: connections in use.
    :ivar overflow: connections open beyond ``size``.
    :ivar waiting: checkouts in progress (waiting for a free connection, or connecting).
    :ivar timeouts: checkouts that gave up after ``pool_timeout`` (SQLAlchemy's
        ``TimeoutError``), in total.
    """

    size: int = 0
    max: int = 0
    idle: int = 0
    checked_out: int = 0
    overflow: int = 0
    waiting: int = 0
    timeouts: int = 0


@dataclass(frozen=True, slots=True)
class RetryCounts:
    """Retries by what was retried (each is one failed attempt followed by another)."""

    connect: int = 0
    statement: int = 0
    transaction: int = 0
    commit_check: int = 0


@dataclass(frozen=True, slots=True)
class CommitCounts:
    """COMMITs whose reply was lost, by what the server said became of them."""

    committed: int = 0
    aborted: int = 0
    unknown: int = 0
    read_only: int = 0


@dataclass(frozen=True, slots=True, eq=False)
class EngineStats(Mapping[str, int]):
    """What one resilient engine did, and its pool's state; also a read-only mapping of the
    raw counters (as ``get_stats()`` returned before: ``dict(stats)``, ``stats.items()``...).

    :ivar engine: the engine's URL, password masked.
    :ivar pool: the pool's state.
    :ivar breaker: ``"closed"``, ``"open"``, ``"half-open"``; None without a breaker.
    :ivar retries: retries by what was retried.
    :ivar connect_failures: connect attempts that failed.
    :ivar disconnects: connections found lost while in use.
    :ivar invalidated_connections: single connections thrown away (found dead at checkout,
        lost while in use).
    :ivar invalidated_pools: whole-pool invalidations (a restart kills every connection:
        older ones are replaced at their next checkout).
    :ivar replays: first statements run again on a new connection.
    :ivar commits: lost COMMITs, by resolved outcome.
    :ivar breaker_opened: times the circuit breaker opened.
    :ivar breaker_fail_fast: connects refused at once by the open breaker.
    :ivar hang_aborts: calls the hang monitor aborted (dead link, hung host).
    :ivar statement_timeouts: statements cut off at ``command_timeout`` / the deadline.
    :ivar counters: every raw counter, by key.
    """

    engine: str
    pool: PoolStats
    breaker: Literal["closed", "open", "half-open"] | None
    retries: RetryCounts
    connect_failures: int
    disconnects: int
    invalidated_connections: int
    invalidated_pools: int
    replays: int
    commits: CommitCounts
    breaker_opened: int
    breaker_fail_fast: int
    hang_aborts: int
    statement_timeouts: int
    counters: Mapping[str, int] = field(repr=False)

    def __getitem__(self, key: str) -> int:
        """The raw counter ``key`` (e.g. ``"retry.connect.unavailable"``); 0 if never seen."""
        return self.counters.get(key, 0)

    def __contains__(self, key: object) -> bool:
        """Whether raw counter ``key`` was ever counted."""
        return key in self.counters

    def __iter__(self) -> Iterator[str]:
        """The raw counters' keys."""
        return iter(self.counters)

    def __len__(self) -> int:
        return len(self.counters)

    @overload
    def get(self, key: str, /) -> int | None: ...
    @overload
    def get(self, key: str, default: int, /) -> int: ...
    @overload
    def get(self, key: str, default: _T, /) -> int | _T: ...
    def get(self, key: str, default: object = None, /) -> object:
        """The raw counter ``key``, or ``default`` if never seen."""
        return self.counters.get(key, default)

    @classmethod
    def build(
        cls,
        engine: str,
        counts: Mapping[str, int],
        pool: PoolStats,
        breaker: Literal["closed", "open", "half-open"] | None,
    ) -> EngineStats:
        """A snapshot from raw counters (see :meth:`Stats.snapshot`)."""
        c = counts.get
        return cls(
            engine=engine,
            pool=pool,
            breaker=breaker,
            retries=RetryCounts(
                connect=c("retry.connect", 0),
                statement=c("retry.statement", 0),
                transaction=c("retry.transaction", 0),
                commit_check=c("retry.commit-check", 0),
            ),
            connect_failures=c("connect.failed", 0),
            disconnects=c("disconnect", 0),
            invalidated_connections=c("invalidated.connection", 0),
            invalidated_pools=c("invalidated.pool", 0),
            replays=c("replay.statement", 0),
            commits=CommitCounts(
                committed=c("commit.committed", 0),
                aborted=c("commit.aborted", 0),
                unknown=c("commit.unknown", 0),
                read_only=c("commit.read-only", 0),
            ),
            breaker_opened=c("breaker.opened", 0),
            breaker_fail_fast=c("breaker.fail_fast", 0),
            hang_aborts=sum(n for k, n in counts.items() if k.startswith("hang.aborted.")),
            statement_timeouts=c("watchdog.fired", 0),
            counters=dict(counts),
        )


def pool_stats(pool: Any, *, waiting: int = 0, timeouts: int = 0) -> PoolStats:
    """Read a pool's state through its public ``QueuePool`` methods (0 where a pool class has
    none; SQLAlchemy's negative overflow, not-yet-opened slots, is reported as 0)."""

    def count(method: str) -> int:
        fn = getattr(pool, method, None)
        if not callable(fn):
            return 0
        try:
            value = fn()
        except Exception:  # another pool class with a same-named method
            return 0
        return max(0, value) if isinstance(value, int) else 0

    size = count("size")
    if isinstance(pool, QueuePool):
        max_overflow = _sqla.max_overflow(pool)
        most = -1 if max_overflow < 0 else size + max_overflow
    elif isinstance(pool, (StaticPool, AssertionPool)):
        most = 1  # one connection, shared or asserted
    else:
        most = -1  # NullPool, SingletonThreadPool: no limit the pool enforces
    return PoolStats(
        size=size,
        max=most,
        idle=count("checkedin"),
        checked_out=count("checkedout"),
        overflow=count("overflow"),
        waiting=waiting,
        timeouts=timeouts,
    )
