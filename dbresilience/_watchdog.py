"""A client-side bound on blocking driver calls, for networks that go silent.

libpq has keepalives and ``tcp_user_timeout``, but they cannot see a peer that still ACKs
and never answers (a stuck proxy, a blackholing middlebox, a frozen server): a query then
blocks for ever. The watchdog bounds every guarded call on a psycopg connection: past its
deadline it shuts the connection's socket down (``shutdown(SHUT_RDWR)`` on a duplicate of the
descriptor), which wakes the blocked call with "server closed the connection unexpectedly";
that is classified ``disconnect`` and the connection is discarded.

One daemon thread per process wakes every :data:`TICK` seconds, so a call returns within its
bound plus one tick. Arming and disarming is a dict write and delete: no syscalls.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, Protocol

from dbresilience._observability import logger

__all__ = ["TICK", "Guarded", "Watchdog", "watchdog"]

TICK = 0.1  # seconds between checks


class Guarded(Protocol):
    """Who armed the watchdog: knows the socket of its connections and is told of overruns."""

    def fileno(self, connection: Any) -> int: ...

    def overran(self) -> None: ...


class Watchdog:
    """Shuts down sockets of calls that overran their deadline."""

    def __init__(self, tick: float = TICK) -> None:
        self._tick = tick
        # connection -> (deadline, owner): one blocking call per connection at a time.
        self._armed: dict[Any, tuple[float, Guarded]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def armed(self) -> dict[Any, tuple[float, Guarded]]:
        """The watched calls, for hot paths that arm inline (``armed[conn] = (deadline,
        owner)`` then ``armed.pop(conn, None)``). Call :meth:`start` first."""
        return self._armed

    def start(self) -> None:
        """Start the watchdog thread if it is not running yet."""
        if self._thread is None:
            self._start()

    def arm(self, seconds: float, connection: object, owner: Guarded) -> None:
        """Start bounding a blocking call on ``connection`` to ``seconds`` (plus one tick).

        :meth:`disarm` it in a ``finally``. Past the deadline the watchdog shuts down
        ``owner.fileno(connection)`` and calls ``owner.overran()``.
        """
        if self._thread is None:
            self._start()
        self._armed[connection] = (time.monotonic() + seconds, owner)

    def disarm(self, connection: object) -> None:
        """The call on ``connection`` returned (or failed): stop watching it."""
        self._armed.pop(connection, None)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="dbresilience-watchdog", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self._tick)
            self._sweep(time.monotonic(), list(self._armed.items()))

    def _sweep(self, now: float, seen: list[tuple[Any, tuple[float, Guarded]]]) -> None:
        """Fire on the calls of ``seen`` (a snapshot of the armed ones) overdue at ``now``."""
        armed = self._armed
        for connection, entry in seen:
            # Compare and pop: the call seen may have returned and its connection been armed
            # again (a new call, a new entry) since the snapshot; only the same entry is fired.
            # (Re-armed between get() and pop(), two bytecodes apart, the new call would lose
            # its bound, never be cut off by mistake.)
            if (
                now >= entry[0]
                and armed.get(connection) is entry
                and armed.pop(connection, None) is entry
            ):
                self._fire(connection, entry[1])

    @staticmethod
    def _fire(connection: object, owner: Guarded) -> None:
        try:
            fd = os.dup(owner.fileno(connection))
        except Exception:
            return  # already closed
        try:
            with socket.socket(fileno=fd) as sock:
                sock.shutdown(socket.SHUT_RDWR)
            owner.overran()
        except Exception:
            logger.exception("dbresilience watchdog could not shut a socket down")


watchdog = Watchdog()
