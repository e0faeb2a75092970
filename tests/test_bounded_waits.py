"""Issue #5's acceptance runs: a blackholed network and a server that stays down.

Every call returns - success or a classified error - within the bound the policy documents;
while the server is down the circuit breaker makes calls fail fast without touching the
network, lets one probe connect through at a time, and the first probe that succeeds brings
the engine back.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Callable

import pytest
import tenacity
from _support import join_all
from sqlalchemy import Engine, text

import dbresilience
from dbresilience import Policy, create_resilient_engine, get_stats
from dbresilience._observability import Stats
from dbresilience._retrying import retry_kwargs
from dbresilience._watchdog import TICK
from dbresilience.testing import ChaosProxy, PostgresCluster

BLACKHOLE = 13.0
# Small bounds so the blackhole outlasts them; the defaults are documented in Policy.
POLICY = Policy(
    command_timeout=1.0,
    connect_timeout=2,
    connect_deadline=2.0,
    commit_check_timeout=2.0,
    circuit_breaker=False,
)


def longest_path(policy: Policy) -> list[float]:
    """The bounded waits on the longest path of one ``with engine.begin(): 2 statements`` call,
    from the policy. One bounded call (a statement, the commit's id query and COMMIT under one
    arming, a ROLLBACK, a checkout ping) is ``command_timeout`` plus the watchdog's tick;
    getting a connection is ``connect_deadline`` plus the attempt in flight
    (``connect_timeout``).

    - checkout: a pooled connection that looks dead is pinged (one call), then replaced (one
      connect);
    - the first statement (one call): when it finds the connection already dead (killed, or
      shut down without a mark of ours), it is replayed after a reconnect: one connect and one
      call more;
    - the second statement: one call;
    - COMMIT (one call) and, its reply lost, the commit check: ``commit_check_timeout``, which
      its last connect attempt may overrun by one ``connect_timeout`` (libpq: 2 s at least).
      A call that does not reach COMMIT ends with a ROLLBACK instead (one call), or none when
      the connection was lost: never both.

    Not bounded (yet), hence kept out of these tests: the queries that set a new connection up
    before the pool hands it out (SQLAlchemy's dialect setup, asyncpg's type codecs, the
    commit checker's facts query) are not armed; a blackhole that begins between a connect
    and them holds the call as long as it lasts. The tests fill the pool before the
    blackhole, so that no connection is being set up when it begins.
    """
    call = policy.command_timeout + TICK
    connect = policy.connect_deadline + policy.connect_timeout
    return [
        *(call, connect),  # checkout
        *(call, connect, call),  # first statement, replayed
        call,  # second statement
        *(call, policy.commit_check_timeout, policy.connect_timeout),  # COMMIT, commit check
    ]


def call_bound(policy: Policy, lag: float = 0.0) -> float:
    """Longest one ``with engine.begin(): 2 statements`` call may take: the sum of
    :func:`longest_path`, plus ``lag`` for each of its waits. ``lag`` is how late a thread or
    task may be scheduled after its wait ended (the GIL, the CPU, the event loop's other
    tasks): the product bounds the waits, not the machine; the tests measure it meanwhile."""
    path = longest_path(policy)
    return sum(path) + len(path) * lag


class Lag:
    """How late a 50 ms sleep wakes up, at worst, while the test runs: in a thread (``sync``)
    or in the event loop's thread, behind the other tasks (``task``)."""

    STEP = 0.05

    def __init__(self) -> None:
        self.worst = 0.0
        self.stopped = threading.Event()

    def _seen(self, t0: float) -> None:
        self.worst = max(self.worst, time.monotonic() - t0 - self.STEP)

    def thread(self) -> threading.Thread:
        def run() -> None:
            while not self.stopped.is_set():
                t0 = time.monotonic()
                time.sleep(self.STEP)
                self._seen(t0)

        thread = threading.Thread(target=run, name="lag", daemon=True)
        thread.start()
        return thread

    async def task(self) -> None:
        while not self.stopped.is_set():
            t0 = time.monotonic()
            await asyncio.sleep(self.STEP)
            self._seen(t0)


def _hammer(
    call: Callable[[], None], threads: int, stop: threading.Event
) -> tuple[list[float], list[str], list[threading.Thread]]:
    latencies: list[float] = []
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                call()
                outcome = "ok"
            except dbresilience.ResilienceError as e:
                outcome = type(e).__name__
            dt = time.monotonic() - t0
            with lock:
                latencies.append(dt)
                outcomes.append(outcome)

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    return latencies, outcomes, pool


def _fill_pool(engine: Engine, n: int) -> None:
    """Make the pool's ``n`` connections now (see :func:`longest_path`)."""
    held = [engine.connect() for _ in range(n)]
    for conn in held:
        conn.execute(text("select 1"))
    for conn in held:
        conn.close()
    assert engine.pool.checkedin() == n  # type: ignore[attr-defined]


def test_blackhole_sync_every_call_returns_within_the_bound(pg: PostgresCluster) -> None:
    pg.execute("create table ledger (id serial primary key, n int)")
    with ChaosProxy(pg.host, pg.port) as proxy:
        engine = create_resilient_engine(pg.url(port=proxy.port), policy=POLICY, pool_size=8)

        def call() -> None:
            with engine.begin() as conn:
                conn.execute(text("insert into ledger (n) values (1)"))
                conn.execute(text("select count(*) from ledger")).scalar_one()

        _fill_pool(engine, 8)
        stop = threading.Event()
        lag = Lag()
        lag_thread = lag.thread()
        latencies, outcomes, threads = _hammer(call, 8, stop)
        time.sleep(1.0)
        proxy.blackhole()
        time.sleep(BLACKHOLE)
        proxy.passthrough()
        time.sleep(2.0)
        stop.set()
        join_all(threads, timeout=call_bound(POLICY, lag.worst) + 5)
        lag.stopped.set()
        join_all([lag_thread], timeout=5)
        worst = max(latencies)
        bound = call_bound(POLICY, lag.worst)
        errors = {o for o in outcomes if o != "ok"}
        print(
            f"\nsync blackhole: calls={len(latencies)} worst={worst:.2f}s "
            f"bound={bound:.1f}s (scheduling lag {lag.worst * 1000:.0f} ms) "
            f"errors={sorted(errors)} watchdog={get_stats(engine).get('watchdog.fired', 0)}"
        )
        assert worst < bound
        assert errors, "the blackhole must have surfaced (classified) errors"
        assert get_stats(engine)["watchdog.fired"] > 0
        assert outcomes[-1] == "ok", "the engine works again after the blackhole"
        engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_blackhole_async_every_task_returns_within_the_bound(
    pg: PostgresCluster, driver: str
) -> None:
    from dbresilience import create_async_resilient_engine

    pg.execute("create table ledger (id serial primary key, n int)")
    with ChaosProxy(pg.host, pg.port) as proxy:
        engine = create_async_resilient_engine(
            pg.url(driver, port=proxy.port), policy=POLICY, pool_size=16
        )
        latencies: list[float] = []
        outcomes: list[str] = []
        stop = asyncio.Event()

        async def task() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    async with engine.begin() as conn:
                        await conn.execute(text("insert into ledger (n) values (1)"))
                        await conn.execute(text("select count(*) from ledger"))
                    outcomes.append("ok")
                except dbresilience.ResilienceError as e:
                    outcomes.append(type(e).__name__)
                latencies.append(time.monotonic() - t0)

        held = [await engine.connect() for _ in range(16)]  # fill the pool (see longest_path)
        for conn in held:
            await conn.execute(text("select 1"))
        for conn in held:
            await conn.close()
        assert engine.sync_engine.pool.checkedin() == 16  # type: ignore[attr-defined]
        lag = Lag()
        lag_task = asyncio.create_task(lag.task())
        tasks = [asyncio.create_task(task()) for _ in range(16)]
        await asyncio.sleep(1.0)
        proxy.blackhole()
        await asyncio.sleep(BLACKHOLE)
        proxy.passthrough()
        await asyncio.sleep(2.0)
        stop.set()
        done, pending = await asyncio.wait(tasks, timeout=call_bound(POLICY, lag.worst) + 5)
        assert not pending, f"{len(pending)} tasks stuck"
        for t in done:
            t.result()  # no task died of an unclassified error
        lag.stopped.set()
        await asyncio.wait_for(lag_task, 5)
        worst = max(latencies)
        bound = call_bound(POLICY, lag.worst)
        print(
            f"\n{driver} async blackhole: calls={len(latencies)} worst={worst:.2f}s "
            f"bound={bound:.1f}s (event-loop lag {lag.worst * 1000:.0f} ms) "
            f"errors={sorted(set(outcomes) - {'ok'})}"
        )
        assert worst < bound
        assert outcomes[-1] == "ok"
        await engine.dispose()


def test_rollback_into_a_blackhole_is_bounded_and_moot(pg: PostgresCluster) -> None:
    # The ROLLBACK at the end of a block is guarded too; past the bound the connection is shut
    # down, the rollback is moot (the server drops the transaction with the connection) and the
    # pool replaces the connection.
    with ChaosProxy(pg.host, pg.port) as proxy:
        engine = create_resilient_engine(pg.url(port=proxy.port), policy=POLICY)
        with engine.connect() as conn:
            conn.execute(text("select 1"))
            proxy.blackhole()
            t0 = time.monotonic()
        took = time.monotonic() - t0
        proxy.passthrough()
        stats = get_stats(engine)
        assert stats["watchdog.fired"] == 1
        assert stats["rollback.on_dead_connection"] == 1
        assert took < POLICY.command_timeout + 1.0, took  # the bound plus the watchdog's tick
        with engine.connect() as conn:
            assert conn.execute(text("select 2")).scalar_one() == 2
        engine.dispose()


@pytest.mark.asyncio
async def test_async_rollback_into_a_blackhole_is_bounded_and_moot(pg: PostgresCluster) -> None:
    from dbresilience import create_async_resilient_engine

    with ChaosProxy(pg.host, pg.port) as proxy:
        engine = create_async_resilient_engine(pg.url("asyncpg", port=proxy.port), policy=POLICY)
        async with engine.connect() as conn:
            await conn.execute(text("select 1"))
            proxy.blackhole()
            t0 = time.monotonic()
        took = time.monotonic() - t0
        proxy.passthrough()
        stats = get_stats(engine)
        assert stats["watchdog.fired"] == 1
        assert stats["rollback.on_dead_connection"] == 1
        assert took < POLICY.command_timeout + 1.0, took
        async with engine.connect() as conn:
            assert (await conn.execute(text("select 2"))).scalar_one() == 2
        await engine.dispose()


def test_server_down_breaker_fails_fast_and_recovers(pg: PostgresCluster) -> None:
    policy = Policy(breaker_min_duration=3.0, connect_deadline=10.0)
    engine = create_resilient_engine(pg.url(), policy=policy, pool_size=8)
    breaker = dbresilience._engine_hooks.resilience_of(engine).breaker
    assert breaker is not None
    stop = threading.Event()

    def call() -> None:
        with engine.connect() as conn:
            conn.execute(text("select 1"))

    latencies, outcomes, threads = _hammer(call, 8, stop)
    time.sleep(0.5)
    pg.stop()
    down_at = time.monotonic()
    while breaker.times_opened == 0 and time.monotonic() - down_at < 20:
        time.sleep(0.01)
    opened_after = time.monotonic() - down_at
    assert breaker.times_opened > 0, "breaker never opened"
    attempts_when_opened = get_stats(engine).get("connect.failed", 0)
    n_before = len(latencies)
    time.sleep(30.0 - opened_after)
    open_for = time.monotonic() - down_at - opened_after
    fail_fast = [
        dt for dt, o in zip(latencies[n_before:], outcomes[n_before:], strict=False)
        if o == "CircuitOpen"
    ]
    attempts_during_open = get_stats(engine).get("connect.failed", 0) - attempts_when_opened
    # One caller alone, so the figure is the cost of failing fast, not waiting for the GIL.
    stop.set()
    join_all(threads, timeout=15)
    alone: list[float] = []
    deadline = time.monotonic() + 30
    while len(alone) < 200:
        assert time.monotonic() < deadline, f"only {len(alone)} calls failed fast in 30 s"
        fast = breaker.rejecting()  # else this call takes the probe slot: not timed
        t0 = time.perf_counter()
        with pytest.raises(dbresilience.DatabaseUnavailable):
            call()
        if fast:
            alone.append(time.perf_counter() - t0)
    stop.clear()
    latencies, outcomes, threads = _hammer(call, 8, stop)
    pg.start()
    back_at = time.monotonic()
    while not (outcomes and outcomes[-1] == "ok") and time.monotonic() - back_at < 10:
        time.sleep(0.01)
    recovered_after = time.monotonic() - back_at
    stop.set()
    join_all(threads, timeout=15)
    print(
        f"\nbreaker opened {opened_after:.2f}s into the outage after "
        f"{attempts_when_opened} failed connects; while open: {len(fail_fast)} calls (8 threads) "
        f"failed fast, {attempts_during_open} probe connects in {open_for:.1f}s; one caller "
        f"alone fails fast in {statistics.median(alone) * 1e6:.0f} us median, "
        f"{sorted(alone)[int(len(alone) * 0.99)] * 1e6:.0f} us p99; "
        f"recovered {recovered_after:.2f}s after restart"
    )
    assert len(fail_fast) > 1000
    # While open, the server sees one probe at a time, every uniform(0, connect_wait_max)
    # seconds at the backoff's cap: ~2 / connect_wait_max per second on average (8/s), not
    # one per caller. Twice that, plus the backoff's first steps, is a bound with a wide margin.
    assert attempts_during_open <= 4 / policy.connect_wait_max * open_for + 5
    assert outcomes[-1] == "ok"
    # pg_ctl start returns up to 0.1 s after the server accepts; then one probe slot
    # (<= connect_wait_max) and one connect. 1 s leaves room for a loaded 2-core machine.
    assert recovered_after < 1.0
    engine.dispose()


def test_constraint_violations_never_open_the_breaker(shared_pg: PostgresCluster) -> None:
    shared_pg.execute("create table if not exists uniq (id int primary key)")
    shared_pg.execute("insert into uniq values (1) on conflict do nothing")
    engine = create_resilient_engine(
        shared_pg.url(), policy=Policy(breaker_failures=1, breaker_min_duration=0.0)
    )
    for _ in range(20):
        with pytest.raises(Exception, match="duplicate key"), engine.begin() as conn:
            conn.execute(text("insert into uniq values (1)"))
    state = dbresilience._engine_hooks.resilience_of(engine).breaker
    assert state is not None and state.state == "closed"
    engine.dispose()


def test_retry_loop_gives_up_at_once_when_retry_after_outlasts_deadline() -> None:
    # A failure asking for a wait (an open breaker's retry_after) that reaches past the
    # deadline ends the loop at once instead of sleeping towards a deadline it cannot meet.
    # (The engine's breaker asks for at most connect_wait_max; this is the loop's side.)
    calls = 0

    def fail() -> None:
        nonlocal calls
        calls += 1
        error = dbresilience.CircuitOpen("open")
        error.retry_after = 60.0  # type: ignore[attr-defined]
        raise error

    retrying = tenacity.Retrying(
        **retry_kwargs(
            "transaction",
            attempts=10,
            deadline=5.0,
            wait_initial=0.05,
            wait_max=1.0,
            stats=Stats("test"),
            retry_if=lambda e: True,
        )
    )
    t0 = time.monotonic()
    with pytest.raises(dbresilience.CircuitOpen):
        retrying(fail)
    assert calls == 1
    assert time.monotonic() - t0 < 0.5


def test_run_transaction_ends_at_its_deadline_while_the_server_stays_down(
    pg: PostgresCluster,
) -> None:
    # The open breaker paces run_transaction's attempts (retry_after) without making it
    # overrun its deadline, and only its probes reach the (down) server.
    engine = create_resilient_engine(
        pg.url(),
        policy=Policy(breaker_failures=1, breaker_min_duration=0.0, connect_deadline=0.5),
    )
    breaker = dbresilience._engine_hooks.resilience_of(engine).breaker
    assert breaker is not None
    pg.stop()
    with pytest.raises(dbresilience.DatabaseUnavailable):
        engine.connect()  # opens the breaker
    assert breaker.times_opened == 1
    failed_before = get_stats(engine).get("connect.failed", 0)
    deadline = 2.0
    t0 = time.monotonic()
    with pytest.raises(dbresilience.DatabaseUnavailable):
        dbresilience.run_transaction(
            engine, lambda c: c.execute(text("select 1")), policy=Policy(deadline=deadline)
        )
    took = time.monotonic() - t0
    failed = get_stats(engine).get("connect.failed", 0) - failed_before
    print(f"\nrun_transaction gave up after {took:.2f}s (deadline {deadline}s); {failed} probes")
    assert deadline - 0.3 <= took < deadline + 0.5  # plus one attempt in flight
    # One probe at a time, at most every uniform(0, 0.25 s) plus the connect: ~8/s on average.
    assert failed <= 4 / Policy().connect_wait_max * deadline + 5
    engine.dispose()
