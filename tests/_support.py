"""Shared test support: the exactly-once ledger check and the password-protected server."""

from __future__ import annotations

import asyncio
import multiprocessing
import select
import threading
import time
import warnings
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dbresilience import run_async_transaction, run_transaction
from dbresilience.testing import PostgresCluster

SCRAM_ROLE = "app"
SCRAM_SECRET = "Sw0rdf1sh-Sekr3t"


def scram_cluster() -> Iterator[PostgresCluster]:
    """A server where role ``app`` must authenticate with scram-sha-256 over TCP."""
    cluster = PostgresCluster(settings={"password_encryption": "'scram-sha-256'"})
    cluster.start()
    cluster.execute(f"create role {SCRAM_ROLE} login password '{SCRAM_SECRET}'")
    hba = cluster.datadir / "pg_hba.conf"
    # First match wins: scram for the test role, trust (unchanged) for postgres.
    hba.write_text(f"host all {SCRAM_ROLE} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    cluster.execute("select pg_reload_conf()")
    yield cluster
    cluster.destroy()


@dataclass
class Ledger:
    """What the workers were told: acknowledged (worker, seq) writes and errors."""

    acknowledged: set[tuple[int, int]] = field(default_factory=set)
    errors: list[BaseException] = field(default_factory=list)
    success_times: list[float] = field(default_factory=list)
    longest_silence: float = 0.0


def ledger_workload(
    engine: Engine, fault: Callable[[threading.Event], None], *, threads: int, duration: float
) -> Ledger:
    """``threads`` workers run ``run_transaction(insert-then-count)`` into table ``ledger``
    for ``duration`` seconds while ``fault(stop)`` runs in a thread of its own."""
    ledger = Ledger()
    lock = threading.Lock()
    stop = threading.Event()

    def insert_then_count(conn: Connection, worker: int, seq: int) -> int:
        conn.execute(
            text("insert into ledger (worker, seq) values (:w, :s)"), {"w": worker, "s": seq}
        )
        return int(conn.execute(text("select count(*) from ledger")).scalar_one())

    def worker(n: int) -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            try:
                run_transaction(engine, lambda c, s=seq: insert_then_count(c, n, s))
            except Exception as e:
                with lock:
                    ledger.errors.append(e)
                continue
            with lock:
                ledger.acknowledged.add((n, seq))
                ledger.success_times.append(time.monotonic())

    workers = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(threads)]
    for t in workers:
        t.start()
    faulter = threading.Thread(target=fault, args=(stop,), daemon=True)
    faulter.start()
    time.sleep(duration)
    stop.set()
    join_all([faulter], timeout=30, what="the fault thread")
    join_all(workers, timeout=60, what="a worker")
    return ledger


async def async_ledger_workload(
    engine: AsyncEngine,
    fault: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
    *,
    tasks: int,
    duration: float,
    max_silence: float,
) -> Ledger:
    """``tasks`` asyncio tasks run ``run_async_transaction(insert-then-count)`` into table
    ``ledger`` for ``duration`` seconds while ``fault(stop)`` runs as a task of its own. A task
    still running ``max_silence`` seconds after the stop fails the run (a stuck task)."""
    ledger = Ledger()
    stop = asyncio.Event()

    async def insert_then_count(conn: AsyncConnection, worker: int, seq: int) -> int:
        await conn.execute(
            text("insert into ledger (worker, seq) values (:w, :s)"), {"w": worker, "s": seq}
        )
        return int((await conn.execute(text("select count(*) from ledger"))).scalar_one())

    async def worker(n: int) -> None:
        seq = 0
        last = time.monotonic()
        while not stop.is_set():
            seq += 1
            try:
                await run_async_transaction(engine, partial(insert_then_count, worker=n, seq=seq))
            except Exception as e:
                ledger.errors.append(e)
                await asyncio.sleep(0.001)
                continue
            now = time.monotonic()
            ledger.longest_silence = max(ledger.longest_silence, now - last)
            last = now
            ledger.acknowledged.add((n, seq))
            ledger.success_times.append(now)

    workers = [asyncio.create_task(worker(n)) for n in range(tasks)]
    faulter = asyncio.create_task(fault(stop))
    await asyncio.sleep(duration)
    stop.set()
    await asyncio.wait_for(faulter, 30)
    done, stuck = await asyncio.wait(workers, timeout=max_silence)
    for task in stuck:
        task.cancel()
    # (a plain module: pytest does not rewrite these asserts, so say what failed)
    assert not stuck, f"{len(stuck)} tasks stuck"
    for task in done:
        task.result()
    return ledger


def join_all(
    threads: Iterable[threading.Thread], *, timeout: float, what: str = "a thread"
) -> None:
    """Join ``threads`` within ``timeout`` seconds in all; fail naming the ones still running."""
    deadline = time.monotonic() + timeout
    threads = list(threads)
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    # (a plain module: pytest does not rewrite these asserts, so say what failed)
    assert not stuck, f"{what} is stuck after {timeout} s: {stuck}"


def wait_readable(fileno: int, *, timeout: float = 10.0) -> None:
    """Block (the event loop too, on purpose) until the socket ``fileno`` has something to
    read: the server's FATAL or EOF has reached it. Fails after ``timeout`` seconds."""
    readable, _, _ = select.select([fileno], [], [], timeout)
    assert readable, f"nothing arrived on socket {fileno} within {timeout} s"


def check_exactly_once(pg: PostgresCluster, ledger: Ledger, *, label: str, minimum: int) -> None:
    """Compare the ``ledger`` table with what was acknowledged: nothing lost, nothing twice."""
    rows = [(int(str(w)), int(str(s))) for w, s in pg.execute("select worker, seq from ledger")]
    present = set(rows)
    duplicates = len(rows) - len(present)
    missing = ledger.acknowledged - present
    unacknowledged = present - ledger.acknowledged
    print(
        f"\n{label}: acknowledged={len(ledger.acknowledged)} rows={len(rows)} "
        f"errors={len(ledger.errors)} missing={len(missing)} duplicates={duplicates} "
        f"unacknowledged={len(unacknowledged)} longest_silence={ledger.longest_silence:.3f}s"
    )
    # (a plain module: pytest does not rewrite these asserts, so say what failed)
    assert not ledger.errors, f"errors reached the caller: {[repr(e) for e in ledger.errors[:5]]}"
    assert not missing, f"acknowledged writes missing: {sorted(missing)[:10]}"
    assert duplicates == 0, f"{duplicates} writes applied twice"
    assert not unacknowledged, f"unacknowledged writes present: {sorted(unacknowledged)[:10]}"
    assert len(ledger.acknowledged) > minimum, "too little work got through to mean anything"


def wait_until_accepting(pg: PostgresCluster, *, timeout: float = 30.0) -> float | None:
    """Probe every 5 ms, independently of the code under test; when did the server accept?"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            psycopg.connect(host=pg.host, port=pg.port, user="postgres", connect_timeout=2).close()
            return time.monotonic()
        except psycopg.OperationalError:
            time.sleep(0.005)
    return None


def start_forked(target: Callable[..., None], *args: object) -> tuple[Any, Any]:
    """Run ``target(*args, pipe)`` in a forked child (gunicorn --preload, Celery prefork);
    returns (the child, the parent's end of the pipe) for :func:`result_of_forked`."""
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    with warnings.catch_warnings():  # Python 3.12+: fork() of a multi-threaded process
        warnings.simplefilter("ignore", DeprecationWarning)
        child = ctx.Process(target=target, args=(*args, child_end))
        child.start()
    return child, parent_end


def result_of_forked(child: Any, parent_end: Any, *, timeout: float, message: str = "") -> Any:
    """What the child sent, within ``timeout`` seconds; the child is joined (killed if stuck)."""
    try:
        assert parent_end.poll(timeout), message or "the child sent nothing"
        return parent_end.recv()
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join(10)
