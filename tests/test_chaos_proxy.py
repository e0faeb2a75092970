"""Tests for the TCP chaos proxy, against an in-process echo server (no database needed)."""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dbresilience.testing._chaos import ChaosMode, ChaosProxy, ChaosStats

pytestmark = pytest.mark.timeout(15)

WAIT = 3.0  # seconds: upper bound for condition waits


class EchoServer:
    """Threaded TCP echo server on 127.0.0.1 that records data, EOFs and resets it sees."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._cond = threading.Condition()
        self.data = bytearray()  # everything received, all connections
        self.connections = 0
        self.resets = 0  # ConnectionResetError seen on recv or send
        self.eofs = 0
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._start_thread(self._accept_loop, "echo-accept")

    def _start_thread(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, name=name, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._cond:
                self.connections += 1
                self._conns.append(conn)
                self._cond.notify_all()
            self._start_thread(self._serve, "echo-conn", conn)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        with self._cond:
                            self.eofs += 1
                            self._cond.notify_all()
                        return
                    with self._cond:
                        self.data += data
                        self._cond.notify_all()
                    conn.sendall(data)
            except ConnectionResetError:
                with self._cond:
                    self.resets += 1
                    self._cond.notify_all()
            except OSError:
                pass

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, timeout), "echo server condition not reached"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._cond:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # unblocks recv() in the serving thread
        for thread in self._threads:
            thread.join(WAIT)
        stuck = [t.name for t in self._threads if t.is_alive()]
        assert not stuck, f"echo server threads still running: {stuck}"


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[ChaosProxy]:
    with ChaosProxy("127.0.0.1", echo.port) as p:
        yield p


@pytest.fixture(autouse=True)
def _no_leaked_proxy_threads() -> Iterator[None]:
    yield
    wait_until(lambda: not proxy_threads())


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ChaosProxy")]


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def connect(p: ChaosProxy, timeout: float = WAIT) -> socket.socket:
    sock = socket.create_connection((p.host, p.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, f"unexpected EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def round_trip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    return recv_exact(sock, len(payload))


def assert_reset(sock: socket.socket) -> None:
    """The next recv fails with ECONNRESET: a real RST, not a FIN (which would give b"")."""
    sock.settimeout(WAIT)
    with pytest.raises(ConnectionResetError):
        data = sock.recv(1024)
        pytest.fail(f"expected ConnectionResetError, got {data!r}")


def assert_new_connection_reset(p: ChaosProxy) -> None:
    """A new connection is reset: usually after connect() returned, else already in connect()."""
    try:
        sock = connect(p)
    except ConnectionResetError:  # the RST won the race against connect() returning
        return
    with sock:
        assert_reset(sock)


def test_passthrough_round_trip_and_stats(proxy: ChaosProxy, echo: EchoServer) -> None:
    assert proxy.mode is ChaosMode.PASS
    assert proxy.host == "127.0.0.1"
    with connect(proxy) as client:
        assert round_trip(client, b"hello") == b"hello"
        assert round_trip(client, b"x" * 1000) == b"x" * 1000
        assert proxy.active_connections == 1
        assert proxy.stats == ChaosStats(
            connections_accepted=1, bytes_upstream=1005, bytes_downstream=1005
        )
    # client FIN is forwarded, the echo server closes, the pair is closed without RST
    echo.wait_for(lambda: echo.eofs == 1)
    wait_until(lambda: proxy.active_connections == 0)
    assert echo.resets == 0
    assert proxy.stats.resets_sent == 0


def test_half_close_is_forwarded(proxy: ChaosProxy, echo: EchoServer) -> None:
    with connect(proxy) as client:
        client.sendall(b"last words")
        client.shutdown(socket.SHUT_WR)
        assert recv_exact(client, 10) == b"last words"
        assert client.recv(10) == b""  # the server's FIN arrives after its data


def test_large_transfer_with_backpressure(proxy: ChaosProxy) -> None:
    payload = bytes(range(256)) * 12_000  # ~3 MB, more than the proxy's per-direction buffer
    with connect(proxy) as client:
        sender = threading.Thread(target=client.sendall, args=(payload,), name="test-sender")
        sender.start()
        received = recv_exact(client, len(payload))
        sender.join(WAIT)
        assert not sender.is_alive(), "sendall() did not finish"
    assert received == payload
    stats = proxy.stats
    assert stats.bytes_upstream == stats.bytes_downstream == len(payload)


def test_latency_delays_both_directions_and_keeps_order(proxy: ChaosProxy) -> None:
    with connect(proxy) as client:
        assert round_trip(client, b"warm-up") == b"warm-up"
        proxy.set_latency(0.2)
        assert proxy.mode is ChaosMode.LATENCY
        assert proxy.latency == 0.2

        start = time.monotonic()
        assert round_trip(client, b"ping") == b"ping"
        elapsed = time.monotonic() - start
        assert 0.4 <= elapsed < 1.2

        chunks = [f"chunk-{i};".encode() for i in range(6)]
        for chunk in chunks:
            client.sendall(chunk)
            time.sleep(0.01)
        assert recv_exact(client, sum(map(len, chunks))) == b"".join(chunks)

        proxy.passthrough()
        start = time.monotonic()
        assert round_trip(client, b"fast") == b"fast"
        assert time.monotonic() - start < 0.2


def test_set_latency_validation(proxy: ChaosProxy) -> None:
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError):
            proxy.set_latency(bad)
    proxy.set_latency(0)
    assert proxy.mode is ChaosMode.PASS


def test_reset_all_sends_real_rst_both_sides(proxy: ChaosProxy, echo: EchoServer) -> None:
    clients = [connect(proxy) for _ in range(3)]
    try:
        for i, client in enumerate(clients):
            assert round_trip(client, b"hi %d" % i) == b"hi %d" % i
        assert proxy.reset_all() == 3
        for client in clients:
            assert_reset(client)
        echo.wait_for(lambda: echo.resets == 3)
        assert echo.eofs == 0
        assert proxy.active_connections == 0
        assert proxy.stats.resets_sent == 6
        assert proxy.reset_all() == 0
        with connect(proxy) as fresh:  # the proxy itself keeps working
            assert round_trip(fresh, b"again") == b"again"
    finally:
        for client in clients:
            client.close()


def test_blackhole_holds_connections_then_passthrough_releases(
    proxy: ChaosProxy, echo: EchoServer
) -> None:
    with connect(proxy) as held:
        assert round_trip(held, b"before") == b"before"
        proxy.blackhole()
        assert proxy.mode is ChaosMode.BLACKHOLE

        held.sendall(b"ping")  # the send itself succeeds
        held.settimeout(0.5)
        with pytest.raises(TimeoutError):  # no data, no EOF (b""), no reset
            held.recv(16)

        with connect(proxy) as new:  # TCP handshake still succeeds
            new.sendall(b"new")
            new.settimeout(0.3)
            with pytest.raises(TimeoutError):
                new.recv(16)
            assert echo.connections == 1  # the new one was never connected upstream
            assert b"ping" not in echo.data
            assert proxy.active_connections == 2

            # documented behaviour: passthrough() resumes held connections with buffered data
            proxy.passthrough()
            held.settimeout(WAIT)
            new.settimeout(WAIT)
            assert recv_exact(held, 4) == b"ping"
            assert recv_exact(new, 3) == b"new"
            assert round_trip(held, b"after") == b"after"
            assert echo.connections == 2

        with connect(proxy) as fresh:
            assert round_trip(fresh, b"fresh") == b"fresh"
    assert echo.resets == 0


def test_refuse_resets_new_connections_only(proxy: ChaosProxy, echo: EchoServer) -> None:
    with connect(proxy) as existing:
        assert round_trip(existing, b"one") == b"one"
        proxy.refuse()
        assert proxy.mode is ChaosMode.REFUSE
        assert_new_connection_reset(proxy)
        assert round_trip(existing, b"two") == b"two"
        stats = proxy.stats
        assert stats.connections_refused == 1
        assert stats.connections_accepted == 2
        assert echo.connections == 1

        proxy.passthrough()
        with connect(proxy) as fresh:
            assert round_trip(fresh, b"three") == b"three"


def test_close_after_match_forwards_commit_then_resets(proxy: ChaosProxy, echo: EchoServer) -> None:
    with connect(proxy) as client:
        proxy.close_after(0, match=b"COMMIT")
        assert round_trip(client, b"BEGIN;") == b"BEGIN;"
        client.sendall(b"xxCOMMITyy")
        assert_reset(client)  # the reply never arrives
    echo.wait_for(lambda: b"xxCOMMITyy" in echo.data and echo.resets == 1)
    assert bytes(echo.data) == b"BEGIN;xxCOMMITyy"
    assert proxy.active_connections == 0
    # one-shot: later connections are not affected
    with connect(proxy) as client:
        assert round_trip(client, b"COMMIT") == b"COMMIT"


def test_close_after_match_across_chunks(proxy: ChaosProxy, echo: EchoServer) -> None:
    with connect(proxy) as client:
        proxy.close_after(match=b"COMMIT")
        assert round_trip(client, b"xxCOM") == b"xxCOM"
        client.sendall(b"MITyy")
        assert_reset(client)
    echo.wait_for(lambda: echo.resets == 1)
    assert bytes(echo.data) == b"xxCOMMITyy"


def test_close_after_nbytes_upstream(proxy: ChaosProxy, echo: EchoServer) -> None:
    with connect(proxy) as client:
        proxy.close_after(10)
        assert round_trip(client, b"abcdef") == b"abcdef"
        client.sendall(b"ghijklmn")
        assert_reset(client)
    echo.wait_for(lambda: echo.resets == 1)
    assert bytes(echo.data) == b"abcdefghij"  # exactly 10 bytes made it upstream
    assert proxy.stats.bytes_upstream == 10


def test_close_after_nbytes_downstream(proxy: ChaosProxy, echo: EchoServer) -> None:
    with connect(proxy) as client:
        proxy.close_after(3, direction="downstream")
        client.sendall(b"hello")
        assert recv_exact(client, 3) == b"hel"
        assert_reset(client)
    echo.wait_for(lambda: echo.resets == 1)


def test_close_after_validation(proxy: ChaosProxy) -> None:
    with pytest.raises(ValueError):
        proxy.close_after(1, direction="sideways")
    with pytest.raises(ValueError):
        proxy.close_after(-1)
    with pytest.raises(ValueError):
        proxy.close_after(match=b"")


def test_passthrough_disarms_close_after(proxy: ChaosProxy, echo: EchoServer) -> None:
    proxy.close_after(match=b"COMMIT")
    proxy.passthrough()
    with connect(proxy) as client:
        assert round_trip(client, b"COMMIT") == b"COMMIT"
    assert echo.resets == 0


def test_set_upstream_redirects_new_connections(proxy: ChaosProxy, echo: EchoServer) -> None:
    second = EchoServer()
    try:
        with connect(proxy) as old:
            assert round_trip(old, b"to-a") == b"to-a"
            proxy.set_upstream("127.0.0.1", second.port)
            assert proxy.upstream == ("127.0.0.1", second.port)
            with connect(proxy) as new:
                assert round_trip(new, b"to-b") == b"to-b"
            assert round_trip(old, b"still-a") == b"still-a"  # existing pair keeps its server
        assert bytes(echo.data) == b"to-astill-a"
        assert bytes(second.data) == b"to-b"
        assert (echo.connections, second.connections) == (1, 1)
    finally:
        second.close()


def test_unreachable_upstream_resets_client() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]  # nothing listens here once closed
    with ChaosProxy("127.0.0.1", dead_port) as proxy:
        assert_new_connection_reset(proxy)
        assert proxy.stats.upstream_failures == 1
        assert proxy.active_connections == 0


def test_upstream_addresses_are_tried_in_order(
    echo: EchoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    real_getaddrinfo = socket.getaddrinfo

    def fake_getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "db.example.test":  # resolves to a dead address first, then the live one
            dead = real_getaddrinfo("127.0.0.1", dead_port, type=socket.SOCK_STREAM)
            return dead + real_getaddrinfo("127.0.0.1", port, type=socket.SOCK_STREAM)
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with ChaosProxy("db.example.test", echo.port) as proxy, connect(proxy) as client:
        assert round_trip(client, b"fallback") == b"fallback"
        assert proxy.stats.upstream_failures == 0


def test_stop_resets_connections_closes_port_and_joins_thread(echo: EchoServer) -> None:
    proxy = ChaosProxy("127.0.0.1", echo.port).start()
    assert [t.name for t in proxy_threads()] == [f"ChaosProxy-{proxy.port}"]
    with connect(proxy) as client:
        assert round_trip(client, b"bye") == b"bye"
        proxy.stop()
        assert not proxy_threads()
        assert_reset(client)
    echo.wait_for(lambda: echo.resets == 1)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((proxy.host, proxy.port), timeout=WAIT).close()
    proxy.stop()  # idempotent
    assert proxy.active_connections == 0
    assert proxy.reset_all() == 0
    with pytest.raises(RuntimeError):
        proxy.start()  # not restartable


def test_lifecycle_errors() -> None:
    proxy = ChaosProxy("127.0.0.1", 1)
    with pytest.raises(RuntimeError):
        _ = proxy.port
    proxy.stop()  # no-op before start
    proxy.set_latency(0.1)  # control calls work before start
    with proxy:
        assert proxy.mode is ChaosMode.LATENCY
        with pytest.raises(RuntimeError):
            proxy.start()
    assert "ChaosProxy" in repr(proxy)
