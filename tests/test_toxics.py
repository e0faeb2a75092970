"""Each toxic of the chaos proxy, measured against a real PostgreSQL server through the proxy.

Run with ``-s`` to see the measurements. Clients are psycopg connections, or a raw socket
speaking just enough of the PostgreSQL protocol (startup, replies) to count segments, EOFs and
resets.
"""

from __future__ import annotations

import socket
import statistics
import struct
import time
from collections.abc import Iterator

import psycopg
import pytest

from dbresilience.testing import (
    Bandwidth,
    ChaosProxy,
    Latency,
    LimitData,
    PostgresCluster,
    ResetPeer,
    Slicer,
    SlowClose,
    Timeout,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def proxy(shared_pg: PostgresCluster) -> Iterator[ChaosProxy]:
    with ChaosProxy(shared_pg.host, shared_pg.port, seed=15) as p:
        yield p


def pg_connect(proxy: ChaosProxy) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        host=proxy.host, port=proxy.port, user="postgres", autocommit=True, connect_timeout=5
    )


def rtt(conn: psycopg.Connection[tuple[object, ...]]) -> float:
    start = time.perf_counter()
    conn.execute("select 1").fetchone()
    return time.perf_counter() - start


STARTUP = b"user\0postgres\0database\0postgres\0\0"
STARTUP_MSG = struct.pack("!ii", 8 + len(STARTUP), 196608) + STARTUP


def raw_startup(proxy: ChaosProxy) -> socket.socket:
    """A raw socket through the proxy with the startup message sent."""
    sock = socket.create_connection((proxy.host, proxy.port), timeout=5)
    sock.sendall(STARTUP_MSG)
    return sock


def read_until_ready(sock: socket.socket) -> tuple[bytes, int]:
    """Read the server's startup replies up to ReadyForQuery; returns (bytes, recv calls)."""
    buf, calls = b"", 0
    while not (len(buf) >= 6 and buf[-6:-5] == b"Z" and buf[-5:-1] == b"\0\0\0\x05"):
        chunk = sock.recv(65536)
        assert chunk, f"EOF after {len(buf)} bytes"
        buf += chunk
        calls += 1
    return buf, calls


def backend_pid(replies: bytes) -> int:
    at = replies.index(b"K\0\0\0\x0c")  # BackendKeyData: pid, secret
    return int(struct.unpack("!i", replies[at + 5 : at + 9])[0])


def test_latency_with_jitter_per_direction(proxy: ChaosProxy) -> None:
    with pg_connect(proxy) as conn:
        base = statistics.median(rtt(conn) for _ in range(10))
        with proxy.toxic(Latency(latency=0.05, jitter=0.01)):  # downstream
            down = [rtt(conn) - base for _ in range(15)]
            with proxy.toxic(Latency(latency=0.03, stream="upstream")):
                both = [rtt(conn) - base for _ in range(10)]
        after = statistics.median(rtt(conn) for _ in range(5))
    spread = max(down) - min(down)
    print(
        f"\nlatency: base rtt {base * 1e3:.2f} ms; +50±10 ms downstream: added "
        f"{statistics.median(down) * 1e3:.1f} ms median, {min(down) * 1e3:.1f}-"
        f"{max(down) * 1e3:.1f} ms; +30 ms upstream too: {statistics.median(both) * 1e3:.1f} ms"
    )
    # Lower bounds are exact (a toxic never delays less); upper ones leave room for a loaded
    # machine (2 shared cores).
    assert min(down) >= 0.039, down
    assert 0.045 <= statistics.median(down) <= 0.075, down
    assert spread >= 0.005  # the jitter shows
    assert min(both) >= 0.069, both
    assert 0.075 <= statistics.median(both) <= 0.11, both
    assert after < base + 0.02  # removed with the block


def test_bandwidth_limits_throughput_per_direction(proxy: ChaosProxy) -> None:
    size, rate = 400_000, 1_000_000
    with pg_connect(proxy) as conn:
        with proxy.toxic(Bandwidth(rate=rate)):
            start = time.perf_counter()
            row = conn.execute("select repeat('x', %s)", (size,)).fetchone()
            down = time.perf_counter() - start
            assert row is not None and len(str(row[0])) == size
            start = time.perf_counter()
            conn.execute("select length(%s)", ("y" * size,))
            up_free = time.perf_counter() - start
        with proxy.toxic(Bandwidth(rate=rate // 2, stream="upstream")):
            start = time.perf_counter()
            conn.execute("select length(%s)", ("y" * size,))
            up = time.perf_counter() - start
    print(
        f"\nbandwidth: 1 MB/s downstream: {size / down / 1e3:.0f} kB/s measured; "
        f"upstream then unaffected ({up_free * 1e3:.0f} ms for 400 kB); "
        f"500 kB/s upstream: {size / up / 1e3:.0f} kB/s"
    )
    assert 0.5 * rate <= size / down <= 1.05 * rate  # never above the rate
    assert up_free < 0.2
    assert 0.5 * rate / 2 <= size / up <= 1.05 * rate / 2


def test_slicer_cuts_replies_into_small_delayed_segments(proxy: ChaosProxy) -> None:
    with raw_startup(proxy) as sock:
        whole, whole_calls = read_until_ready(sock)
    with proxy.toxic(Slicer(average_size=16, size_variation=8, delay=0.002)):
        start = time.perf_counter()
        with raw_startup(proxy) as sock:
            sliced, calls = read_until_ready(sock)
        took = time.perf_counter() - start
        with pg_connect(proxy) as conn:
            row = conn.execute("select repeat('z', 5000)").fetchone()
    print(
        f"\nslicer: startup replies ({len(sliced)} bytes) arrived in {calls} reads "
        f"(unsliced: {whole_calls}), mean {len(sliced) / calls:.1f} bytes, over {took * 1e3:.0f} ms"
    )
    assert len(sliced) == len(whole)
    assert calls >= len(sliced) // 24 - 2  # no slice above 24 bytes
    assert took >= (len(sliced) // 24) * 0.002
    assert row is not None and row[0] == "z" * 5000  # the protocol survives slicing


def test_limit_data_closes_after_exactly_n_bytes(proxy: ChaosProxy) -> None:
    proxy.add_toxic(LimitData(nbytes=5000))
    with pg_connect(proxy) as conn:
        conn.execute("select 1")
        with pytest.raises(psycopg.OperationalError) as caught:
            conn.execute("select repeat('x', 100000)")
    stats = proxy.stats
    print(
        f"\nlimit_data: 5000 bytes downstream, then closed: forwarded {stats.bytes_downstream} "
        f"bytes; client saw {type(caught.value).__name__}: {str(caught.value).strip()[:60]}"
    )
    assert stats.bytes_downstream == 5000
    assert stats.resets_sent == 0  # closed, not reset


def test_reset_peer_after_timeout(proxy: ChaosProxy) -> None:
    proxy.add_toxic(ResetPeer(timeout=0.3))
    start = time.perf_counter()
    with pg_connect(proxy) as conn, pytest.raises(psycopg.OperationalError):
        conn.execute("select pg_sleep(3)")
    psycopg_took = time.perf_counter() - start
    start = time.perf_counter()
    with raw_startup(proxy) as sock:
        read_until_ready(sock)
        with pytest.raises(ConnectionResetError):
            assert sock.recv(100) == b"", "a FIN instead of a reset"
    raw_took = time.perf_counter() - start
    print(
        f"\nreset_peer 0.3 s: psycopg query failed {psycopg_took * 1e3:.0f} ms after connecting; "
        f"raw socket got ECONNRESET after {raw_took * 1e3:.0f} ms; "
        f"resets sent {proxy.stats.resets_sent}"
    )
    assert 0.3 <= psycopg_took < 0.8
    assert 0.3 <= raw_took < 0.8
    assert proxy.stats.resets_sent == 4  # two connections, both sides


def test_toxicity_applies_to_a_share_of_connections(proxy: ChaosProxy) -> None:
    proxy.add_toxic(ResetPeer(toxicity=0.5))
    failed = 0
    attempts = 60
    for _ in range(attempts):
        try:
            pg_connect(proxy).close()
        except psycopg.OperationalError:
            failed += 1
    print(f"\ntoxicity 0.5: {failed} of {attempts} connections reset")
    assert 0.3 * attempts <= failed <= 0.7 * attempts


def test_timeout_drops_data_then_closes(proxy: ChaosProxy) -> None:
    with pg_connect(proxy) as conn:
        proxy.add_toxic(Timeout(timeout=0.5, stream="upstream"))
        start = time.perf_counter()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
        closed_after = time.perf_counter() - start
    proxy.remove_toxic("timeout_upstream")
    proxy.add_toxic(Timeout())  # downstream, never closes
    with raw_startup(proxy) as sock:
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(100)
        proxy.remove_toxic("timeout_downstream")
        with pytest.raises(TimeoutError):  # dropped, not held: nothing comes later either
            sock.recv(100)
    dropped = proxy.stats.bytes_dropped
    print(
        f"\ntimeout 0.5 s upstream: query failed after {closed_after * 1e3:.0f} ms; "
        f"timeout 0 downstream: no reply, {dropped} bytes dropped"
    )
    assert 0.45 <= closed_after < 1.0
    assert dropped > 100  # the server's startup replies (and nothing was buffered)


def test_slow_close_delays_the_fin(proxy: ChaosProxy, shared_pg: PostgresCluster) -> None:
    proxy.add_toxic(SlowClose(delay=0.4))
    with raw_startup(proxy) as sock:
        replies, _ = read_until_ready(sock)
        shared_pg.execute(f"select pg_terminate_backend({backend_pid(replies)})")
        start = time.perf_counter()
        data = sock.recv(1000)  # the FATAL 57P01 message comes at once
        got_error = time.perf_counter() - start
        while sock.recv(1000):
            pass
        got_eof = time.perf_counter() - start
    print(
        f"\nslow_close 0.4 s: error message after {got_error * 1e3:.0f} ms, "
        f"EOF after {got_eof * 1e3:.0f} ms"
    )
    assert data.startswith(b"E") and b"57P01" in data
    assert got_error < 0.2
    assert 0.35 <= got_eof < 1.0


def test_down_refuses_then_up_listens_again(proxy: ChaosProxy) -> None:
    port = proxy.port
    with pg_connect(proxy) as conn:
        proxy.down()
        assert proxy.is_down
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")  # existing connections were reset
    start = time.perf_counter()
    with pytest.raises(psycopg.OperationalError, match="refused"):
        pg_connect(proxy)
    refused_in = time.perf_counter() - start
    proxy.up()
    assert proxy.port == port
    with pg_connect(proxy) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    print(f"\ndown: connect refused in {refused_in * 1e3:.1f} ms; up again on port {port}")
    assert refused_in < 0.5


def test_public_names() -> None:
    import dbresilience.testing as testing

    assert testing.__all__ == sorted(testing.__all__)
    assert all(getattr(testing, name, None) is not None for name in testing.__all__)
    assert {"ChaosProxy", "FaultController", "PgBouncer", "PostgresCluster"} <= set(testing.__all__)


def test_toxics_api(proxy: ChaosProxy) -> None:
    name = proxy.add_toxic(Latency(latency=0.01), name="slow")
    assert name == "slow"
    with pytest.raises(ValueError, match="already"):
        proxy.add_toxic(Latency(), name="slow")
    assert proxy.add_toxic(Bandwidth(rate=10**6, stream="upstream")) == "bandwidth_upstream"
    assert list(proxy.toxics) == ["slow", "bandwidth_upstream"]
    proxy.remove_toxic("slow")
    with pytest.raises(KeyError):
        proxy.remove_toxic("slow")
    proxy.passthrough()  # clears toxics too
    assert proxy.toxics == {}
    for bad in (
        lambda: Latency(latency=-1),
        lambda: Latency(toxicity=1.5),
        lambda: Latency(stream="sideways"),  # type: ignore[arg-type]
        lambda: Bandwidth(rate=0),
        lambda: Slicer(average_size=4, size_variation=4),
        lambda: LimitData(nbytes=-1),
        lambda: Timeout(timeout=float("nan")),
    ):
        with pytest.raises(ValueError):
            bad()


def test_promoted_standby_takes_over_behind_the_proxy() -> None:
    """Failover: the primary goes away, its standby is promoted, the proxy points at it."""
    primary = PostgresCluster(settings={"wal_level": "replica"})
    primary.start()
    standby = PostgresCluster(standby_of=primary)
    try:
        standby.start()
        primary.execute("create table t (x int)")
        primary.execute("insert into t values (1)")
        standby.wait_for_replay(primary)
        assert standby.is_in_recovery()
        assert standby.execute("select x from t") == [(1,)]
        with ChaosProxy(primary.host, primary.port) as proxy:
            primary.stop()
            start = time.perf_counter()
            standby.promote()
            promoted_in = time.perf_counter() - start
            proxy.set_upstream(standby.host, standby.port)
            with pg_connect(proxy) as conn:
                conn.execute("insert into t values (2)")
                rows = conn.execute("select x from t order by x").fetchall()
        print(f"\npromote: standby promoted in {promoted_in * 1e3:.0f} ms")
        assert not standby.is_in_recovery()
        assert rows == [(1,), (2,)]
    finally:
        standby.destroy()
        primary.destroy()
