"""Failover and demotion on real servers: a primary, its synchronous standby, ``pg_ctl promote``
and ``pg_rewind`` (the test kit's :class:`PostgresCluster`), with writers on both drivers.

* **Failover**: writers insert unique ids through ``run_transaction`` /
  ``run_async_transaction`` on a multi-host URL with ``target_session_attrs=read-write``; the
  primary is stopped (``fast``, ``immediate``) and its standby promoted. The ledger: every
  acknowledged id is on the new primary exactly once, no error reached a writer, and the
  writes resumed promptly after the promotion (the gap is printed; the bound asserted is
  generous, the machine is shared).
* **Demotion**: after a failover the old primary comes back as a standby of the new one and
  is listed first in the URL, without ``target_session_attrs``: new connections land on it.
  Its 25006 ("read-only transaction") must be taken for what it is (the server is in
  recovery), the connection replaced, the write retried on the primary, and the demoted
  server tried last from then on: no write fails and none is acknowledged by it.

Synchronous replication (``synchronous_commit=on`` on the primary) is what makes "every
acknowledged write survives the failover" a property of the servers; what is tested is that
the library neither loses, duplicates nor fails any of them on the way.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import psycopg
import pytest
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncConnection

import dbresilience
from dbresilience import (
    EngineStats,
    create_async_resilient_engine,
    create_resilient_engine,
    get_stats,
    run_async_transaction,
    run_transaction,
)
from dbresilience._engine_hooks import resilience_of
from dbresilience.testing import PostgresCluster

WRITERS = 4
GAP_BOUND = 3.0  # seconds from the promotion to the first write on the new primary (noisy CI)
ID_RANGE = 100_000_000  # ids of one Writers: first_id up to first_id + ID_RANGE
WAIT = 20.0  # seconds any wait for the writers may take before the test fails

DRIVERS = ["psycopg", "asyncpg"]
REFUSED = "recovery.write-refused"  # stats: 25006 from a server in recovery


@dataclass
class Ledger:
    """What the writers were told. Ids are unique: ``first_id + worker * 1_000_000 + seq``."""

    first_id: int = 0

    acknowledged: dict[int, tuple[float, int]] = field(default_factory=dict)  # id -> when, port
    unknown: set[int] = field(default_factory=set)  # CommitOutcomeUnknown: may or may not be in
    errors: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def acks(self, port: int, *, after: float = 0.0) -> list[float]:
        with self.lock:
            return sorted(t for t, p in self.acknowledged.values() if p == port and t >= after)


class Writers:
    """``WRITERS`` writers inserting unique ids into ``ledger`` through ``run_transaction``
    (psycopg: threads) or ``run_async_transaction`` (asyncpg: tasks on an event loop of their
    own thread), from ``with`` entry to exit; the stats of the engine are kept at exit."""

    def __init__(self, driver: str, url: str, *, first_id: int = 0, **engine_kwargs: Any) -> None:
        self.driver = driver
        self.first_id = first_id
        self.url = url
        self.engine_kwargs = {"pool_size": WRITERS, **engine_kwargs}
        self.ledger = Ledger(first_id)
        self.stats: EngineStats | None = None
        self._engine: Any = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._crash: list[BaseException] = []

    def _record(self, ident: int, outcome: int | BaseException) -> None:
        ledger = self.ledger
        with ledger.lock:
            if isinstance(outcome, dbresilience.CommitOutcomeUnknown):
                ledger.unknown.add(ident)
            elif isinstance(outcome, BaseException):
                ledger.errors.append(outcome)
            else:
                ledger.acknowledged[ident] = (time.monotonic(), outcome)

    def __enter__(self) -> Writers:
        if self.driver == "asyncpg":
            self._threads = [threading.Thread(target=self._run_async, daemon=True)]
        else:
            engine = create_resilient_engine(self.url, **self.engine_kwargs)
            self._threads = [
                threading.Thread(target=self._sync_writer, args=(engine, n), daemon=True)
                for n in range(WRITERS)
            ]
            self._engine = engine
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        assert not any(t.is_alive() for t in self._threads), "a writer is stuck"
        if self.driver != "asyncpg":
            self.stats = get_stats(self._engine)
            self._engine.dispose()
        if self._crash:
            raise self._crash[0]

    def _sync_writer(self, engine: Any, n: int) -> None:
        def insert(conn: Connection, ident: int) -> int:
            sql = text("insert into ledger (id) values (:id) returning inet_server_port()")
            return int(conn.execute(sql, {"id": ident}).scalar_one())

        seq = 0
        while not self._stop.is_set():
            seq += 1
            ident = self.first_id + n * 1_000_000 + seq
            try:
                port = run_transaction(engine, partial(insert, ident=ident))
            except Exception as e:
                self._record(ident, e)
                time.sleep(0.01)
                continue
            self._record(ident, port)

    def _run_async(self) -> None:
        try:
            asyncio.run(self._async_main())
        except BaseException as e:
            self._crash.append(e)

    async def _async_main(self) -> None:
        engine = self._engine = create_async_resilient_engine(self.url, **self.engine_kwargs)

        async def insert(conn: AsyncConnection, ident: int) -> int:
            sql = text("insert into ledger (id) values (:id) returning inet_server_port()")
            return int((await conn.execute(sql, {"id": ident})).scalar_one())

        async def writer(n: int) -> None:
            seq = 0
            while not self._stop.is_set():
                seq += 1
                ident = self.first_id + n * 1_000_000 + seq
                try:
                    port = await run_async_transaction(engine, partial(insert, ident=ident))
                except Exception as e:
                    self._record(ident, e)
                    await asyncio.sleep(0.01)
                    continue
                self._record(ident, port)

        try:
            await asyncio.wait_for(asyncio.gather(*(writer(n) for n in range(WRITERS))), 120)
        finally:
            self.stats = get_stats(engine)
            await engine.dispose()

    def stats_now(self) -> dict[str, int]:
        """The engine's counters so far (``get_stats`` is thread-safe)."""
        self.wait_for("the engine", lambda: self._engine is not None)
        return get_stats(self._engine)

    def in_recovery_marks(self) -> dict[tuple[str, int], float]:
        """The addresses the engine found refusing writes in recovery, and when."""
        self.wait_for("the engine", lambda: self._engine is not None)
        return dict(resilience_of(self._engine).in_recovery_at)

    def wait_for(self, what: str, done: Callable[[], bool], timeout: float = WAIT) -> None:
        """Poll ``done`` (every 10 ms) until true; fail naming ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {timeout} s; {self.summary()}")
            if self._crash:
                raise self._crash[0]
            time.sleep(0.01)

    def summary(self) -> str:
        ledger = self.ledger
        with ledger.lock:
            errors = [f"{type(e).__name__}: {str(e)[:120]}" for e in ledger.errors[:3]]
            return (
                f"acknowledged={len(ledger.acknowledged)} unknown={len(ledger.unknown)} "
                f"errors={len(ledger.errors)} {errors}"
            )


def check_ledger(server: PostgresCluster, ledger: Ledger, label: str) -> dict[str, int]:
    """Compare the ``ledger`` table on ``server`` with what the writers were told; print it."""
    first = ledger.first_id
    counts = {
        int(str(i)): int(str(n))
        for i, n in server.execute(
            f"select id, count(*) from ledger where id >= {first} and id < {first + ID_RANGE} "
            "group by id"
        )
    }
    acknowledged = set(ledger.acknowledged)
    numbers = {
        "acknowledged": len(acknowledged),
        "errors": len(ledger.errors),
        "unknown": len(ledger.unknown),
        "unknown_committed": len(ledger.unknown & set(counts)),
        "missing": len(acknowledged - set(counts)),
        "duplicated": sum(1 for n in counts.values() if n > 1),
        # committed although the writer was told it failed (unknown outcomes excepted)
        "phantom": len(set(counts) - acknowledged - ledger.unknown),
    }
    print(f"\n{label}: " + " ".join(f"{k}={v}" for k, v in numbers.items()))
    errors = [f"{type(e).__name__}: {e}" for e in ledger.errors[:5]]
    assert numbers["errors"] == 0, f"errors reached the writers: {errors}"
    assert numbers["missing"] == 0, f"acknowledged writes missing: {numbers}"
    assert numbers["duplicated"] == 0, f"writes applied twice: {numbers}"
    assert numbers["phantom"] == 0, f"writes committed but reported failed: {numbers}"
    # Only a COMMIT in flight when the primary went away can be unknown: one per writer.
    assert numbers["unknown"] <= WRITERS, numbers
    return numbers


def multi_host_url(driver: str, *servers: PostgresCluster, read_write: bool) -> str:
    hosts = "&".join(f"host={s.host}:{s.port}" for s in servers)
    attrs = "&target_session_attrs=read-write" if read_write else ""
    return f"postgresql+{driver}://postgres@/postgres?{hosts}{attrs}"


@pytest.fixture
def pair() -> Iterator[tuple[PostgresCluster, PostgresCluster]]:
    """A primary (``ha=True``) and its synchronous standby, with an empty ``ledger`` table;
    both destroyed afterwards."""
    primary = PostgresCluster(ha=True)
    standby: PostgresCluster | None = None
    try:
        primary.start()
        standby = PostgresCluster(standby_of=primary)
        standby.start()
        primary.replicate_synchronously_to(standby)
        primary.execute("create table ledger (id bigint primary key)")
        yield primary, standby
    finally:
        if standby is not None:
            standby.destroy()
        primary.destroy()


@dataclass
class Failover:
    """When things happened (``time.monotonic()``)."""

    stopped: float  # the old primary's pg_ctl stop returned
    writable: float  # a probe of our own (every 2 ms) first saw the standby out of recovery
    promoted: float  # pg_ctl promote returned (it polls every 100 ms: up to that much late)
    first_write: float  # the first write the new primary acknowledged

    def __str__(self) -> str:
        return (
            f"promotion {self.writable - self.stopped:.3f}s after the stop; first acknowledged "
            f"write on the new primary {self.first_write - self.writable:.3f}s after it became "
            f"writable ({self.first_write - self.promoted:+.3f}s from pg_ctl promote "
            f"returning); writes stopped for {self.first_write - self.stopped:.3f}s after the "
            "stop"
        )


def _out_of_recovery(server: PostgresCluster, timeout: float) -> float:
    """Poll ``pg_is_in_recovery()`` on one connection every 2 ms; when was it first false?"""
    with psycopg.connect(
        host=server.host, port=server.port, user="postgres", autocommit=True, connect_timeout=5
    ) as conn:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = conn.execute("select pg_is_in_recovery()").fetchone()
            if row is not None and not row[0]:
                return time.monotonic()
            time.sleep(0.002)
    raise TimeoutError(f"port {server.port} still in recovery after {timeout} s")


def fail_over(
    writers: Writers, primary: PostgresCluster, standby: PostgresCluster, mode: Any
) -> Failover:
    """Once the writers have written to ``primary``: stop it (``mode``) and promote
    ``standby``; wait for their first write on it."""
    writers.wait_for("writes on the primary", lambda: len(writers.ledger.acks(primary.port)) >= 20)
    primary.stop(mode)
    stopped = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        writable = pool.submit(_out_of_recovery, standby, WAIT)
        standby.promote()
        promoted = time.monotonic()
        became_writable = writable.result(WAIT + 5)
    writers.wait_for(
        "a write on the promoted standby", lambda: bool(writers.ledger.acks(standby.port))
    )
    first = writers.ledger.acks(standby.port)[0]
    return Failover(stopped, became_writable, promoted, first)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
@pytest.mark.parametrize("driver", DRIVERS)
def test_failover_to_the_synchronous_standby_loses_nothing(
    pair: tuple[PostgresCluster, PostgresCluster], driver: str, mode: str
) -> None:
    primary, standby = pair
    url = multi_host_url(driver, primary, standby, read_write=True)
    with Writers(driver, url) as writers:
        failover = fail_over(writers, primary, standby, mode)
        writers.wait_for(
            "more writes on the new primary", lambda: len(writers.ledger.acks(standby.port)) >= 50
        )
    numbers = check_ledger(standby, writers.ledger, f"failover {driver} stop -m {mode}")
    print(f"{failover}\n{writers.stats}")
    assert failover.first_write - failover.writable < GAP_BOUND, str(failover)
    assert numbers["acknowledged"] >= 70
    # Every write acknowledged after the failover was the new primary's, except COMMITs lost
    # at the stop that the commit check then found committed on the promoted standby (their
    # transaction ran on the old primary; the answer came later).
    late = writers.ledger.acks(primary.port, after=failover.first_write)
    assert writers.stats is not None
    assert len(late) <= writers.stats.commits.committed, (late, writers.stats)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_demoted_primary_listed_first_takes_no_write(
    pair: tuple[PostgresCluster, PostgresCluster], driver: str
) -> None:
    primary, standby = pair
    # The old primary first, no target_session_attrs: every new connection lands on it
    # once it is back as a standby. Overflow connections: new ones all along.
    url = multi_host_url(driver, primary, standby, read_write=False)
    # Connections recycled every 0.3 s: new ones land on the old primary once it is back
    # (before that, during the failover, on the standby: it refuses writes until promoted).
    with Writers(driver, url, pool_recycle=0.3) as writers:
        print(f"\n{fail_over(writers, primary, standby, 'fast')}")
        before = writers.stats_now()
        rejoining = time.monotonic()
        primary.rejoin_as_standby_of(standby)
        rejoined = time.monotonic()
        # A second of writing: every connection recycled a few times since it is back.
        writers.wait_for(
            "writes after the rejoin",
            lambda: (
                time.monotonic() > rejoined + 1.0
                and len(writers.ledger.acks(standby.port, after=rejoined)) >= 100
            ),
        )
        refused_at = writers.in_recovery_marks().get((primary.host, primary.port), 0.0)
    check_ledger(standby, writers.ledger, f"demotion {driver}, an engine of before")
    refused = writers.stats.get(REFUSED, 0) - before.get(REFUSED, 0)
    print(f"writes refused by the demoted primary: {refused}; {writers.stats}")
    assert primary.is_in_recovery()
    assert not writers.ledger.acks(primary.port, after=rejoining)
    # Connections did land on it (it refused a write), and then it was tried last: a few
    # refusals (those of the writers' connections made before the first), not one per write.
    assert refused_at > rejoining, "no connection reached the demoted primary"
    assert refused <= 3 * WRITERS, refused
    # A new engine whose first host is the demoted primary.
    with Writers(driver, url, first_id=ID_RANGE) as fresh:
        fresh.wait_for("writes of a new engine", lambda: len(fresh.ledger.acks(standby.port)) >= 50)
        assert (primary.host, primary.port) in fresh.in_recovery_marks()
    check_ledger(standby, fresh.ledger, f"demotion {driver}, a new engine")
    print(f"writes refused by the demoted primary: {fresh.stats.get(REFUSED)}; {fresh.stats}")
    assert not fresh.ledger.acks(primary.port)
    assert 1 <= fresh.stats.get(REFUSED, 0) <= 3 * WRITERS


def test_hosts_that_refused_a_write_in_recovery_are_tried_last_the_latest_last() -> None:
    from dbresilience._hooks.connect import try_hosts_last

    libpq = {"host": "a,b,c", "port": "1,2,3"}
    assert try_hosts_last(libpq, {("a", 1): 20.0, ("b", 2): 10.0})
    assert libpq == {"host": "c,b,a", "port": "3,2,1"}
    asyncpg: dict[str, Any] = {"host": ["a", "b"], "port": [1, 2]}
    assert try_hosts_last(asyncpg, {("a", 1): 5.0})
    assert asyncpg == {"host": ["b", "a"], "port": [2, 1]}
    assert not try_hosts_last(asyncpg, {("a", 1): 5.0})  # already last
    assert not try_hosts_last({"host": "a", "port": "1"}, {("a", 1): 5.0})  # one host
