"""A client-side bound on blocking driver calls, for networks that go silent.

libpq has keepalives and ``tcp_user_timeout``, but they cannot see a peer that still ACKs
and never answers (a stuck proxy, a blackholing middlebox, a frozen server): a query then
blocks for ever. The watchdog bounds every guarded call on a psycopg connection: past its
deadline it shuts the connection's socket down (``shutdown(SHUT_RDWR)`` on a duplicate of the
descriptor), which wakes the blocked call with "server closed the connection unexpectedly";
that is classified ``disconnect`` and the connection is discarded.

One daemon thread per process wakes every :data:`TICK` seconds, so a call returns within its
bound plus one tick. Arming and disarming a guard is a dict write and delete: no syscalls.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections.abc import Callable

from dbresilience._observability import logger

__all__ = ["TICK", "Watchdog", "watchdog"]

TICK = 0.1  # seconds between checks


class Watchdog:
    """Shuts down sockets of calls that overran their deadline."""

    def __init__(self, tick: float = TICK) -> None:
        self._tick = tick
        self._armed: dict[int, tuple[float, Callable[[], int], Callable[[], None]]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, fileno: Callable[[], int], on_fire: Callable[[], None]) -> int:
        """Start bounding a blocking call to ``seconds`` (plus one tick); return its key.

        Always pair with :meth:`disarm` in a ``finally``.
        """
        if self._thread is None:
            self._start()
        key = next(self._ids)
        self._armed[key] = (time.monotonic() + seconds, fileno, on_fire)
        return key

    def disarm(self, key: int) -> None:
        """The call returned (or failed): stop watching it."""
        self._armed.pop(key, None)

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
            now = time.monotonic()
            for key, (deadline, fileno, on_fire) in list(self._armed.items()):
                if now >= deadline and self._armed.pop(key, None) is not None:
                    self._fire(fileno, on_fire)

    @staticmethod
    def _fire(fileno: Callable[[], int], on_fire: Callable[[], None]) -> None:
        try:
            fd = os.dup(fileno())
        except Exception:
            return  # already closed
        try:
            with socket.socket(fileno=fd) as sock:
                sock.shutdown(socket.SHUT_RDWR)
            on_fire()
        except Exception:
            logger.exception("dbresilience watchdog could not shut a socket down")


watchdog = Watchdog()
