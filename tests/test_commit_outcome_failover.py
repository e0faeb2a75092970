"""Commit verification across a failover, on real servers: a primary, its synchronous
streaming standby, a COMMIT whose reply is lost (chaos proxy between the app and the primary),
the primary stopped and the standby promoted while the resolver asks. The engine's URL names
both (multi-host, ``target_session_attrs=read-write``), so the resolver's checking connection
reaches the promoted standby, on a new timeline: its answer is trusted only as far as the
module docstring of ``dbresilience._commit_outcome`` proves it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.ext.asyncio import AsyncConnection

import dbresilience
from dbresilience import (
    Policy,
    create_async_resilient_engine,
    create_resilient_engine,
    get_stats,
)
from dbresilience.testing import ChaosProxy, PostgresCluster
from dbresilience.testing._toxics import Latency

_XID_SQL = "select pg_current_xact_id_if_assigned()::text"  # what the resolver asks first
_BOUND = 60.0  # seconds: any wait of the failover thread (2 cores, other suites running)
_POLICY = Policy(commit_check_timeout=40.0)


@dataclass
class Pair:
    primary: PostgresCluster
    standby: PostgresCluster
    to_primary: ChaosProxy  # the app's only way to the primary
    to_standby: ChaosProxy  # the app's way to the standby; refuses until the failover is done
    replication: ChaosProxy  # the standby's way to the primary
    engine: Engine
    seen: dict[str, object] = field(default_factory=dict)  # what the failover thread read

    def url(self, driver: str) -> str:
        return _url(self.to_primary, self.to_standby, driver)

    def rows(self) -> list[int]:
        return [int(str(r[0])) for r in self.standby.execute("select id from ledger order by id")]


def _url(to_primary: ChaosProxy, to_standby: ChaosProxy, driver: str = "psycopg") -> str:
    """Both servers, through the proxies; connect to the one that accepts writes."""
    return (
        f"postgresql+{driver}://postgres@/postgres?host=127.0.0.1:{to_primary.port}"
        f"&host=127.0.0.1:{to_standby.port}&target_session_attrs=read-write"
    )


def _wait(what: str, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + _BOUND
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {_BOUND} s")
        time.sleep(0.01)  # polling a server


@pytest.fixture
def pair(dbr_postgresql_factory: Callable[..., PostgresCluster]) -> Iterator[Pair]:
    primary = dbr_postgresql_factory(settings={"synchronous_commit": "on"})
    primary.execute("create table ledger (id int primary key)")
    primary.execute(
        "create table child (id int primary key, parent int references ledger(id) "
        "deferrable initially deferred)"
    )
    # Pages for the promoted standby to write at its first checkpoint (see _replayed_past).
    primary.execute(
        "create table filler as select g, repeat('x', 200) p from generate_series(1, 10000) g"
    )
    primary.execute("checkpoint")  # else the base backup's (spread) checkpoint takes seconds
    standby = dbr_postgresql_factory(standby_of=primary, start=False)
    with (
        ChaosProxy(primary.host, primary.port) as to_primary,
        ChaosProxy(standby.host, standby.port) as to_standby,
        ChaosProxy(primary.host, primary.port) as replication,
    ):
        with (standby.datadir / "postgresql.auto.conf").open("a") as conf:  # later lines win
            conf.write(
                f"primary_conninfo = 'host=127.0.0.1 port={replication.port} user=postgres'\n"
            )
        standby.start()
        primary.execute("alter system set synchronous_standby_names = '*'")  # after the backup:
        primary.execute("select pg_reload_conf()")  # the standby's own config is without it
        sql = "select count(*) from pg_stat_replication where sync_state = 'sync'"
        _wait("the standby becomes synchronous", lambda: primary.execute(sql) == [(1,)])
        engine = create_resilient_engine(_url(to_primary, to_standby), policy=_POLICY)
        yield Pair(primary, standby, to_primary, to_standby, replication, engine)
        engine.dispose()


def _catch_up(pair: Pair) -> None:
    """Wait until the standby replayed all the primary wrote: up to a WAL record written now
    (an LSN from the primary's insert position may never be reached while it idles)."""
    lsn = pair.primary.execute("select pg_logical_emit_message(false, 'test', '')")[0][0]
    sql = f"select pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"
    _wait("the standby replays", lambda: pair.standby.execute(sql) == [(True,)])


def _xid(conn: Connection) -> int:
    # Not the resolver's query text: _fail_over() may wait for that one.
    return int(conn.execute(text("select pg_current_xact_id()::text")).scalar_one())


def _replayed_past(pair: Pair, xid: int) -> None:
    """Make the standby's latest restartpoint a checkpoint of the primary taken after ``xid``
    was assigned (so the promoted standby can prove it replayed past it), then dirty it."""
    pair.primary.execute("checkpoint")
    _catch_up(pair)
    pair.standby.execute("checkpoint")  # a restartpoint at the primary's checkpoint
    sql = "select timeline_id, next_xid from pg_control_checkpoint()"
    tli, next_xid = pair.standby.execute(sql)[0]
    epoch, _, low = str(next_xid).partition(":")
    assert tli == 1
    assert (int(epoch) << 32) | int(low) > xid
    _dirty_standby(pair)


def _dirty_standby(pair: Pair) -> None:
    """Give the standby pages to write, so that the checkpoint it starts when promoted (the
    end of the proof) is a spread one that takes seconds, not a moment."""
    pair.primary.execute("vacuum freeze filler")  # WAL without an xid; dirties every page
    _catch_up(pair)


def _fail_over(
    pair: Pair,
    xid: int,
    *,
    until: str,
    stop: Literal["fast", "immediate"] = "fast",
    checkpoint: bool = False,
) -> threading.Thread:
    """In the background: once the primary's backend reached ``until`` ('ended': its
    transaction is over; 'asked': it answered the resolver's xid query; 'waits': its COMMIT
    waits for the synchronous standby), stop the primary
    (``stop`` mode), promote the standby (then ``checkpoint`` it: its first checkpoint on the
    new timeline), note what it says of ``xid``, and only then let the app reach it."""

    def ended() -> bool:
        rows = pair.primary.execute(
            "select count(*) from pg_stat_activity where backend_xid is not null "
            "and pid <> pg_backend_pid()"
        )
        return rows == [(0,)]

    def asked() -> bool:
        rows = pair.primary.execute(
            f"select count(*) from pg_stat_activity where query = '{_XID_SQL}' "
            "and state = 'idle in transaction'"
        )
        return rows == [(1,)]

    def waits() -> bool:
        rows = pair.primary.execute(
            "select count(*) from pg_stat_activity where wait_event = 'SyncRep'"
        )
        return rows == [(1,)]

    def run() -> None:
        try:
            _wait(
                f"the primary's backend: {until}",
                {"ended": ended, "asked": asked, "waits": waits}[until],
            )
            pair.primary.stop(stop)
            pair.standby.promote()
            if checkpoint:
                pair.standby.execute("checkpoint")
            status = pair.standby.execute(  # (asking pg_xact_status would raise 22023)
                f"select case when '{xid}'::xid8 >= pg_snapshot_xmax(pg_current_snapshot()) "
                f"then 'in the future' else pg_xact_status('{xid}'::xid8) end"
            )
            pair.seen["status"] = status[0][0]
            pair.seen["checkpoint_timeline"] = pair.standby.execute(
                "select timeline_id from pg_control_checkpoint()"
            )[0][0]
        except BaseException as exc:
            pair.seen["error"] = exc
        finally:
            pair.to_standby.passthrough()

    pair.to_primary.refuse()  # from now on the old primary is out of the app's reach...
    pair.to_standby.refuse()  # ...and the standby until it is promoted
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_replicated_commit_is_committed_on_the_promoted_standby(pair: Pair) -> None:
    calls: list[int] = []
    failover: list[threading.Thread] = []

    def work(conn: Connection) -> None:
        calls.append(1)
        conn.execute(text("insert into ledger values (1)"))
        xid = _xid(conn)
        _replayed_past(pair, xid)
        failover.append(_fail_over(pair, xid, until="ended"))
        pair.to_primary.close_after(match=b"COMMIT")  # the primary commits; the reply is lost

    dbresilience.run_transaction(pair.engine, work)
    failover[0].join(_BOUND)
    assert "error" not in pair.seen
    assert pair.seen == {"status": "committed", "checkpoint_timeline": 1}
    assert calls == [1]  # not run again
    assert pair.rows() == [1]
    stats = get_stats(pair.engine)
    assert (stats.get("commit.committed"), stats.get("commit.unknown")) == (1, None)


def test_commit_that_failed_is_retried_once_on_the_promoted_standby(pair: Pair) -> None:
    calls: list[int] = []
    failover: list[threading.Thread] = []

    def work(conn: Connection) -> None:
        calls.append(1)
        conn.execute(text("insert into ledger values (1)"))
        if len(calls) == 1:  # the deferred foreign key fails at COMMIT: the primary aborts
            conn.execute(text("insert into child values (1, 999)"))
            xid = _xid(conn)
            _replayed_past(pair, xid)
            failover.append(_fail_over(pair, xid, until="ended"))
            pair.to_primary.close_after(match=b"COMMIT")

    dbresilience.run_transaction(pair.engine, work)
    failover[0].join(_BOUND)
    assert pair.seen == {"status": "aborted", "checkpoint_timeline": 1}
    assert calls == [1, 1]  # retried once, on the promoted standby
    assert pair.rows() == [1]
    assert pair.standby.execute("select count(*) from child") == [(0,)]
    stats = get_stats(pair.engine)
    assert (stats.get("commit.aborted"), stats.get("commit.unknown")) == (1, None)


def test_transaction_cut_off_by_the_crash_is_retried_once(pair: Pair) -> None:
    """The primary crashes before the COMMIT reaches it: neither a commit nor an abort record
    of the transaction is in the promoted standby's history, which reports it "aborted" (not
    committed, not running)."""
    calls: list[int] = []
    failover: list[threading.Thread] = []

    def work(conn: Connection) -> None:
        calls.append(1)
        conn.execute(text("insert into ledger values (1)"))
        if len(calls) == 1:
            xid = _xid(conn)
            _replayed_past(pair, xid)
            failover.append(_fail_over(pair, xid, until="asked", stop="immediate"))
            # The resolver's xid query and then the COMMIT each take 4 s to get there: the
            # primary is killed in between.
            pair.to_primary.add_toxic(Latency(latency=4.0, stream="upstream"))

    dbresilience.run_transaction(pair.engine, work)
    failover[0].join(_BOUND)
    assert pair.seen == {"status": "aborted", "checkpoint_timeline": 1}
    assert calls == [1, 1]
    assert pair.rows() == [1]
    stats = get_stats(pair.engine)
    assert (stats.get("commit.aborted"), stats.get("commit.unknown")) == (1, None)


@pytest.mark.parametrize(("streamed", "status"), [(True, "aborted"), (False, "in the future")])
def test_commit_only_the_old_primary_had_is_retried_once(
    pair: Pair, streamed: bool, status: str
) -> None:
    """The link to the standby dies (with, or before, the transaction's first write): the
    primary writes the commit record, and its COMMIT waits for the synchronous standby when
    the primary crashes. The promoted standby never had the commit: "aborted" (it had the
    write, so the xid predates the promotion) or "in the future" (it had nothing of it). Not
    committed where the work now lives: retried once, there."""
    calls: list[int] = []
    failover: list[threading.Thread] = []

    def work(conn: Connection) -> None:
        calls.append(1)
        if len(calls) == 1:
            _dirty_standby(pair)
            if not streamed:
                pair.replication.blackhole()
        conn.execute(text("insert into ledger values (1)"))
        if len(calls) == 1:
            xid = _xid(conn)
            if streamed:
                _catch_up(pair)
                pair.replication.blackhole()
            failover.append(_fail_over(pair, xid, until="waits", stop="immediate"))

    dbresilience.run_transaction(pair.engine, work)
    failover[0].join(_BOUND)
    assert pair.seen == {"status": status, "checkpoint_timeline": 1}
    assert calls == [1, 1]
    assert pair.rows() == [1]
    stats = get_stats(pair.engine)
    assert (stats.get("commit.aborted"), stats.get("commit.unknown")) == (1, None)


@pytest.mark.parametrize("proof", ["no restartpoint", "new timeline checkpoint"])
def test_commit_without_proof_is_unknown(pair: Pair, proof: str) -> None:
    """The commit did replicate, but the promoted standby cannot prove that it replayed past
    it: its latest checkpoint predates the xid (the base backup's), or it is already on the
    new timeline. "committed" might be another transaction's: unknown, and not run again."""
    calls: list[int] = []
    failover: list[threading.Thread] = []

    def work(conn: Connection) -> None:
        calls.append(1)
        conn.execute(text("insert into ledger values (1)"))
        xid = _xid(conn)
        if proof == "no restartpoint":  # killed: no shutdown checkpoint to restart from either
            failover.append(_fail_over(pair, xid, until="ended", stop="immediate"))
        else:
            _replayed_past(pair, xid)
            failover.append(_fail_over(pair, xid, until="ended", checkpoint=True))
        pair.to_primary.close_after(match=b"COMMIT")

    with pytest.raises(dbresilience.CommitOutcomeUnknown):
        dbresilience.run_transaction(pair.engine, work)
    failover[0].join(_BOUND)
    assert pair.seen["status"] == "committed"
    assert pair.seen["checkpoint_timeline"] == (1 if proof == "no restartpoint" else 2)
    assert calls == [1]
    assert pair.rows() == [1]
    stats = get_stats(pair.engine)
    assert (stats.get("commit.unknown"), stats.get("commit.committed")) == (1, None)


@pytest.mark.asyncio
@pytest.mark.parametrize("committed", [True, False])
async def test_asyncpg_commit_outcome_on_the_promoted_standby(pair: Pair, committed: bool) -> None:
    """The same resolution inside SQLAlchemy's greenlet, with asyncpg: a replicated commit is
    not run again, one that failed on the server is retried once on the promoted standby."""
    engine = create_async_resilient_engine(pair.url("asyncpg"), policy=_POLICY)
    calls: list[int] = []
    failover: list[threading.Thread] = []

    async def work(conn: AsyncConnection) -> None:
        calls.append(1)
        await conn.execute(text("insert into ledger values (1)"))
        if len(calls) == 1:
            if not committed:  # the deferred foreign key fails at COMMIT
                await conn.execute(text("insert into child values (1, 999)"))
            xid = int((await conn.execute(text("select pg_current_xact_id()::text"))).scalar_one())
            _replayed_past(pair, xid)  # blocking, in the event loop: nothing else runs
            failover.append(_fail_over(pair, xid, until="ended"))
            pair.to_primary.close_after(match=b"COMMIT")

    try:
        await dbresilience.run_async_transaction(engine, work)
        stats = get_stats(engine)
    finally:
        await engine.dispose()
    failover[0].join(_BOUND)
    status = "committed" if committed else "aborted"
    assert pair.seen == {"status": status, "checkpoint_timeline": 1}
    assert calls == ([1] if committed else [1, 1])
    assert pair.rows() == [1]
    assert (stats.get(f"commit.{status}"), stats.get("commit.unknown")) == (1, None)
