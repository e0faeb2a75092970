"""docker/README.md's failover drill without Docker: a primary, its streaming standby, and an
async engine on a multi-host URL with ``target_session_attrs=read-write``. Under load the
primary is stopped and the standby promoted; the engine finds the new primary by itself.

Checked on the promoted server: nothing acknowledged is missing, nothing is applied twice,
writes resumed. One thing may reach a task, by design: :class:`CommitOutcomeUnknown` for a
COMMIT the shutdown cut. Its check can only ask the promoted standby, on a new timeline where
the transaction id may already name another transaction, so the engine does not guess (at most
one per task: the stop cuts each connection once)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from _support import async_ledger_workload

from dbresilience import CommitOutcomeUnknown, create_async_resilient_engine, get_stats
from dbresilience.testing import PostgresCluster

TASKS = 8
DURATION = 6.0
MAX_SILENCE = 10.0  # seconds a task may go without a commit (primary down ~1.2 s in all)


@pytest.fixture
def pair() -> Iterator[tuple[PostgresCluster, PostgresCluster]]:
    primary = PostgresCluster()
    try:
        primary.start()
        # No unique constraint on purpose: a transaction applied twice must show up.
        primary.execute("create table ledger (worker int, seq int)")
        standby = PostgresCluster(standby_of=primary)  # cloned here: the primary must be up
        try:
            standby.start()
            # Streaming: the primary's fast shutdown then hands it all the WAL first.
            deadline = time.monotonic() + 30
            while primary.execute("select state from pg_stat_replication") != [("streaming",)]:
                assert time.monotonic() < deadline, "the standby is not streaming after 30 s"
                time.sleep(0.05)  # polling the primary's view of its standby
            yield primary, standby
        finally:
            standby.destroy()
    finally:
        primary.destroy()


@pytest.mark.asyncio
@pytest.mark.slow
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_promoted_standby_takes_the_writes_exactly_once(
    pair: tuple[PostgresCluster, PostgresCluster], driver: str
) -> None:
    primary, standby = pair
    url = (
        f"postgresql+{driver}://postgres@/postgres?host={primary.host}:{primary.port}"
        f"&host={standby.host}:{standby.port}&target_session_attrs=read-write"
    )
    engine = create_async_resilient_engine(url, pool_size=TASKS)
    promoted: list[float] = []

    async def failover(stop: asyncio.Event) -> None:
        await asyncio.sleep(1.5)
        await asyncio.to_thread(primary.stop)  # fast shutdown: the standby gets all the WAL
        await asyncio.sleep(1.0)
        await asyncio.to_thread(standby.promote)
        promoted.append(time.monotonic())

    try:
        ledger = await async_ledger_workload(
            engine, failover, tasks=TASKS, duration=DURATION, max_silence=MAX_SILENCE
        )
        stats = get_stats(engine)
    finally:
        await engine.dispose()
    found = standby.execute("select worker, seq from ledger")
    rows = [(int(str(w)), int(str(q))) for w, q in found]
    present = set(rows)
    missing = ledger.acknowledged - present
    unacknowledged = present - ledger.acknowledged
    unknown = [e for e in ledger.errors if isinstance(e, CommitOutcomeUnknown)]
    after = [t for t in ledger.success_times if promoted and t > promoted[0]]
    first = f"{after[0] - promoted[0]:.3f}s" if after else "never"
    print(
        f"\nfailover ({driver}): acknowledged={len(ledger.acknowledged)} rows={len(rows)} "
        f"errors={len(ledger.errors)} (commit outcome unknown: {len(unknown)}) "
        f"missing={len(missing)} duplicates={len(rows) - len(present)} "
        f"unacknowledged={len(unacknowledged)} longest_silence={ledger.longest_silence:.3f}s"
        f"\n{stats}\nfirst commit after the promotion: +{first}"
    )
    assert not missing, f"acknowledged writes missing: {sorted(missing)[:10]}"
    assert len(rows) == len(present), "writes applied twice"
    assert len(unknown) == len(ledger.errors), [repr(e) for e in ledger.errors[:5]]
    assert len(unknown) <= TASKS
    assert len(unacknowledged) <= len(unknown)  # only a COMMIT reported unknown may be there
    assert len(ledger.acknowledged) > 100, "too little work got through to mean anything"
    assert promoted, "the standby was not promoted"
    assert len(after) > 100, "too few writes reached the promoted standby"
    assert stats["retry.connect"] > 0  # the old primary refused, the standby was read-only
    assert ledger.longest_silence < MAX_SILENCE
