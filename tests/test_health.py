"""check_health / check_health_async against real servers: live, stopped, wrong port, bad
password, black-holed and slow (through the chaos proxy)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from _support import SCRAM_ROLE, SCRAM_SECRET
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

import dbresilience
from dbresilience import Policy, create_resilient_engine
from dbresilience._circuit_breaker import CircuitBreaker
from dbresilience._engine_hooks import resilience_of
from dbresilience._health import HealthReport, PoolCounts, check_health, check_health_async
from dbresilience.testing import ChaosProxy, PostgresCluster, free_port

pytestmark = pytest.mark.timeout(60)

SLACK = 0.5  # seconds a check may take beyond its timeout
SECRET = SCRAM_SECRET
ROLE = SCRAM_ROLE


def _resilient_async(url: str) -> AsyncEngine:
    return dbresilience.create_async_resilient_engine(url)


@pytest.fixture
def proxy(shared_pg: PostgresCluster) -> Iterator[ChaosProxy]:
    with ChaosProxy(shared_pg.host, shared_pg.port) as chaos:
        yield chaos


@pytest_asyncio.fixture
async def async_engine(shared_pg: PostgresCluster) -> AsyncIterator[AsyncEngine]:
    engine = _resilient_async(shared_pg.url("asyncpg"))
    yield engine
    await engine.dispose()


def _timed(engine: Engine, timeout: float) -> tuple[HealthReport, float]:
    started = time.monotonic()
    report = check_health(engine, timeout=timeout)
    return report, time.monotonic() - started


def _assert_live(report: HealthReport, server: PostgresCluster) -> None:
    assert report.reachable, report.error
    assert report.ready
    assert report.error is None
    assert report.role == "primary"
    ((version,),) = server.execute("show server_version")
    assert report.server_version == version
    assert report.latency is not None
    assert 0 < report.latency < 1.0


# -- sync ------------------------------------------------------------------------------------


def test_live_server(shared_pg: PostgresCluster) -> None:
    engine = create_resilient_engine(shared_pg.url(), pool_size=3, max_overflow=2)
    try:
        report, elapsed = _timed(engine, 2.0)
        _assert_live(report, shared_pg)
        assert elapsed < 2.0
        assert report.pool == PoolCounts(size=3, checked_in=1, checked_out=0, overflow=0)
        assert report.breaker == "closed"  # a resilient engine has one (Policy's default)
        data = report.to_dict()
        assert json.loads(json.dumps(data)) == data
        assert data["ready"] is True
        assert data["pool"] == {"size": 3, "checked_in": 1, "checked_out": 0, "overflow": 0}
        # The pool counts connections in use by the application too.
        with engine.connect() as held:
            held.execute(text("select 1"))
            busy = check_health(engine)
        assert busy.reachable
        assert busy.pool.checked_out == 1
    finally:
        engine.dispose()


def test_plain_engine_has_no_breaker_and_null_pool_counts_zero(
    shared_pg: PostgresCluster,
) -> None:
    engine = create_engine(shared_pg.url(), poolclass=NullPool)
    try:
        report = check_health(engine)
        _assert_live(report, shared_pg)
        assert report.breaker is None
        assert report.pool == PoolCounts()
    finally:
        engine.dispose()


def test_stopped_server(pg: PostgresCluster) -> None:
    engine = create_resilient_engine(pg.url())
    try:
        assert check_health(engine).reachable
        pg.stop()
        report, elapsed = _timed(engine, 1.0)
        assert elapsed < 1.0 + SLACK
        assert not report.reachable
        assert not report.ready
        assert report.latency is None and report.server_version is None and report.role is None
        assert report.error is not None
        assert report.error.startswith(("unavailable:", "disconnect:")), report.error
        assert report.pool.checked_out == 0
    finally:
        engine.dispose()


@pytest.mark.parametrize("resilient", [True, False], ids=["resilient", "plain"])
def test_wrong_port(shared_pg: PostgresCluster, resilient: bool) -> None:
    url = shared_pg.url(port=free_port())
    engine = create_resilient_engine(url) if resilient else create_engine(url)
    try:
        report, elapsed = _timed(engine, 1.0)
        assert elapsed < 1.0 + SLACK
        assert not report.reachable
        assert report.error is not None
        assert report.error.startswith("unavailable:"), report.error
        assert "refused" in report.error.lower()
    finally:
        engine.dispose()


def test_bad_password_is_reported_without_the_password(scram_pg: PostgresCluster) -> None:
    wrong = "not-" + SECRET
    engine = create_resilient_engine(scram_pg.url(user=ROLE, password=wrong))
    try:
        report, elapsed = _timed(engine, 2.0)
        assert elapsed < 2.0 + SLACK
        assert not report.reachable
        assert report.error is not None
        assert report.error.startswith("permanent:"), report.error
        assert "password authentication failed" in report.error
        for shown in (repr(report), json.dumps(report.to_dict())):
            assert wrong not in shown
            assert SECRET not in shown
    finally:
        engine.dispose()
    good = create_resilient_engine(scram_pg.url(user=ROLE, password=SECRET))
    try:
        assert check_health(good).reachable
    finally:
        good.dispose()


def test_blackholed_server_returns_within_timeout(proxy: ChaosProxy) -> None:
    url = f"postgresql+psycopg://postgres@{proxy.host}:{proxy.port}/postgres"
    engine = create_resilient_engine(url)
    try:
        assert check_health(engine).reachable
        proxy.blackhole()
        for _ in range(2):  # the second check finds the first probe still blocked
            report, elapsed = _timed(engine, 1.0)
            assert elapsed < 1.0 + SLACK
            assert not report.reachable
            assert report.error == "timeout: no answer from the server within 1 s"
        proxy.passthrough()  # the blocked probe gets its answer and returns its connection
        report = check_health(engine, timeout=5.0)
        assert report.reachable, report.error
        assert report.pool.checked_out == 0
    finally:
        proxy.passthrough()
        engine.dispose()


def test_blackholed_connect_returns_within_timeout(proxy: ChaosProxy) -> None:
    proxy.blackhole()
    url = f"postgresql+psycopg://postgres@{proxy.host}:{proxy.port}/postgres"
    engine = create_resilient_engine(url, policy=Policy(connect_timeout=2, connect_deadline=2))
    try:
        report, elapsed = _timed(engine, 1.0)
        assert elapsed < 1.0 + SLACK
        assert not report.reachable
        assert report.error is not None
        assert report.error.startswith("timeout: no connection"), report.error
    finally:
        proxy.passthrough()
        engine.dispose()


def test_breaker_state_is_read_from_the_engine(
    shared_pg: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = create_resilient_engine(shared_pg.url())
    try:
        state = resilience_of(engine)
        now = [0.0]
        # The fake clock stands still: the breaker stays "open" until it is moved past the
        # first probe slot (a full-jitter wait of up to 60 s).
        breaker = CircuitBreaker(
            failures=1,
            min_duration=0,
            probe_wait_initial=60,
            probe_wait_max=60,
            clock=lambda: now[0],
        )
        monkeypatch.setattr(state, "breaker", breaker)
        assert check_health(engine).breaker == "closed"
        assert breaker.record_failure()  # opened
        assert breaker.retry_after() > 0.0
        report = check_health(engine)
        assert report.breaker == "open"
        assert not report.ready  # whatever the probe found
        now[0] = 61.0  # past the probe slot
        report = check_health(engine)
        assert report.breaker in ("half-open", "closed")  # closed if the probe went through it
        assert report.ready
    finally:
        engine.dispose()


def test_bad_arguments(shared_pg: PostgresCluster) -> None:
    engine = create_engine(shared_pg.url())
    with pytest.raises(ValueError, match="timeout"):
        check_health(engine, timeout=0)
    with pytest.raises(TypeError, match="check_health_async"):
        check_health(create_async_engine(shared_pg.url("asyncpg")))  # type: ignore[arg-type]
    engine.dispose()


# -- async -----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_live_server(async_engine: AsyncEngine, shared_pg: PostgresCluster) -> None:
    report = await check_health_async(async_engine)
    _assert_live(report, shared_pg)
    assert report.pool.size == 5
    assert report.pool.checked_in == 1
    assert report.pool.checked_out == 0


@pytest.mark.asyncio
async def test_async_wrong_port(shared_pg: PostgresCluster) -> None:
    engine = _resilient_async(shared_pg.url("asyncpg", port=free_port()))
    try:
        started = time.monotonic()
        report = await check_health_async(engine, timeout=1.0)
        assert time.monotonic() - started < 1.0 + SLACK
        assert not report.reachable
        assert report.error is not None
        assert report.error.startswith("unavailable:"), report.error
    finally:
        await engine.dispose()


@pytest.mark.asyncio
async def test_async_bad_password(scram_pg: PostgresCluster) -> None:
    wrong = "not-" + SECRET
    engine = _resilient_async(scram_pg.url("asyncpg", user=ROLE, password=wrong))
    try:
        report = await check_health_async(engine)
        assert not report.reachable
        assert report.error is not None
        assert report.error.startswith("permanent:"), report.error
        assert wrong not in json.dumps(report.to_dict())
    finally:
        await engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("fault", ["latency", "blackhole"])
async def test_async_timeout_mid_query_leaves_the_pool_sound(proxy: ChaosProxy, fault: str) -> None:
    engine = _resilient_async(f"postgresql+asyncpg://postgres@{proxy.host}:{proxy.port}/postgres")
    try:
        assert (await check_health_async(engine)).reachable
        if fault == "latency":
            proxy.set_latency(1.0)  # the select 1 round trip takes >= 2 s
        else:
            proxy.blackhole()
        started = time.monotonic()
        report = await check_health_async(engine, timeout=0.5)
        assert time.monotonic() - started < 0.5 + SLACK
        assert not report.reachable
        assert report.error == "timeout: no answer from the server within 0.5 s"
        # SQLAlchemy discards the connection that was mid-query, in the background (<= 2 s).
        pool = engine.sync_engine.pool
        deadline = time.monotonic() + 5.0
        while pool.checkedout() and time.monotonic() < deadline:  # type: ignore[attr-defined]
            await asyncio.sleep(0.05)
        assert pool.checkedout() == 0  # type: ignore[attr-defined]
        proxy.passthrough()
        report = await check_health_async(engine, timeout=5.0)
        assert report.reachable, report.error
        assert report.pool.checked_out == 0
    finally:
        proxy.passthrough()
        await engine.dispose()
