"""The watchdog's sweep (pure logic on real sockets: which armed calls it cuts off)."""

from __future__ import annotations

import gc
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbresilience._watchdog import Watchdog


class Owner:
    """A Guarded whose connections are sockets."""

    def __init__(self) -> None:
        self.overruns = 0
        self.cuts: list[object] = []

    def fileno(self, connection: object) -> int:
        assert isinstance(connection, socket.socket)
        return connection.fileno()

    def cutting(self, connection: object, reason: str) -> None:
        self.cuts.append(connection)

    def overran(self, reason: str) -> None:
        self.overruns += 1


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, peer = socket.socketpair()
    peer.settimeout(2)
    yield ours, peer
    ours.close()
    peer.close()


def _cut_off(peer: socket.socket) -> bool:
    """True when our end was shut down (the peer reads EOF), False if it is still open."""
    peer.setblocking(False)
    try:
        return peer.recv(1) == b""
    except BlockingIOError:
        return False


def test_overdue_call_is_cut_off(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    watchdog, owner = Watchdog(), Owner()
    watchdog._armed[ours] = (time.monotonic() - 1, owner)  # armed inline, as the hot paths do
    watchdog._sweep(time.monotonic(), list(watchdog._armed.items()))
    assert _cut_off(peer)
    assert owner.overruns == 1
    assert ours not in watchdog.armed


def test_call_within_its_bound_is_left_alone(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    watchdog, owner = Watchdog(), Owner()
    watchdog._armed[ours] = (time.monotonic() + 60, owner)
    watchdog._sweep(time.monotonic(), list(watchdog._armed.items()))
    assert not _cut_off(peer)
    assert owner.overruns == 0
    assert ours in watchdog.armed


def test_connection_armed_again_after_the_snapshot_is_not_cut_off(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    watchdog, owner = Watchdog(), Owner()
    watchdog._armed[ours] = (time.monotonic() - 1, owner)
    seen = list(watchdog._armed.items())  # the watchdog thread's snapshot...
    watchdog.disarm(ours)  # ...then the call returns and a new one starts on the connection
    watchdog._armed[ours] = (time.monotonic() + 60, owner)
    watchdog._sweep(time.monotonic(), seen)
    assert not _cut_off(peer)
    assert owner.overruns == 0
    assert watchdog.armed[ours][0] > time.monotonic()  # the new call is still watched


def test_call_returned_after_the_snapshot_is_not_cut_off(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    watchdog, owner = Watchdog(), Owner()
    watchdog._armed[ours] = (time.monotonic() - 1, owner)
    seen = list(watchdog._armed.items())
    watchdog.disarm(ours)
    watchdog._sweep(time.monotonic(), seen)
    assert not _cut_off(peer)
    assert owner.overruns == 0


def test_cancel_request_to_a_unix_socket_that_is_gone_leaves_no_socket(tmp_path: Path) -> None:
    # asyncpg over a Unix socket: the watchdog's cancel request finds the server gone. The
    # socket it made must be closed there, not left to the GC (a ResourceWarning: an error).
    from dbresilience._drivers import _send_cancel_request

    before = len(os.listdir("/proc/self/fd"))
    _send_cancel_request(str(tmp_path / ".s.PGSQL.5432"), b"\0" * 16, 1.0)
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before
