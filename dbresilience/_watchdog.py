"""A client-side bound on blocking driver calls, for networks that go silent.

libpq has keepalives and ``tcp_user_timeout``, but they cannot see a peer that still ACKs
and never answers (a stuck proxy, a blackholing middlebox, a frozen server): a query then
blocks for ever. The watchdog bounds every guarded call on a psycopg connection: past its
deadline it shuts the connection's socket down (``shutdown(SHUT_RDWR)`` on a duplicate of the
descriptor), which wakes the blocked call at once. Just before, the owner is told
(:meth:`Guarded.cutting`): it remembers the cut, so that the statement is reported as cut
(a timeout, never replayed: it may still be running on the server), and gives a function that
sends the server a cancel request, which runs on a short-lived thread of its own.

One daemon thread per process wakes every :data:`TICK` seconds, so a call returns within its
bound plus one tick. Arming and disarming is a dict write and delete: no syscalls.

``fork()`` copies no threads: the child restarts the thread (``os.register_at_fork``) and
forgets the parent's armed calls. A thread that dies anyway is logged at CRITICAL and
restarted by :meth:`Watchdog.ensure_alive` (called for every new connection).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from dbresilience._observability import logger

__all__ = ["TICK", "Entry", "Guarded", "Watchdog", "watchdog"]

TICK = 0.1  # seconds between checks


class Guarded(Protocol):
    """Who armed the watchdog: knows the socket of its connections and is told of overruns."""

    def fileno(self, connection: Any) -> int: ...

    def cutting(self, connection: Any, reason: str) -> Callable[[], None] | None:
        """The call on ``connection`` is about to be cut off (``reason``: ``"deadline"``, or
        the hang monitor's verdict): remember it; return a function that asks the server to
        cancel the statement (blocking, bounded, never raising)."""
        ...

    def overran(self, reason: str) -> None:
        """The call on ``connection`` was cut off (its socket shut down): report it."""
        ...


#: An armed call: (deadline, owner, started), monotonic seconds.
Entry = tuple[float, Guarded, float]


class Watchdog:
    """Shuts down sockets of calls that overran their deadline."""

    def __init__(self, tick: float = TICK) -> None:
        self._tick = tick
        # connection -> (deadline, owner): one blocking call per connection at a time.
        self._armed: dict[Any, Entry] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def armed(self) -> dict[Any, Entry]:
        """The watched calls, for hot paths that arm inline (``armed[conn] = (deadline,
        owner, started)`` then ``armed.pop(conn, None)``). Call :meth:`start` first."""
        return self._armed

    def start(self) -> None:
        """Start the watchdog thread if it is not running yet."""
        if self._thread is None:
            self._start()

    @property
    def alive(self) -> bool:
        """True when the thread runs (False before the first :meth:`start`)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def ensure_alive(self) -> None:
        """Restart the thread, loudly, if it was started and has died since."""
        thread = self._thread
        if thread is not None and not thread.is_alive():
            logger.error("dbresilience watchdog thread was dead: restarted")
            with self._lock:
                if self._thread is thread:
                    self._thread = None
            self._start()

    def _after_fork_in_child(self) -> None:
        # Only the forking thread survives a fork: the parent's calls are not ours to watch,
        # its lock may have been held, and its watchdog thread is gone.
        self._lock = threading.Lock()
        self._armed.clear()  # cleared, not replaced: hot paths hold this very dict
        running = self._thread is not None
        self._thread = None
        if running:
            self._start()

    def arm(self, seconds: float, connection: object, owner: Guarded) -> None:
        """Start bounding a blocking call on ``connection`` to ``seconds`` (plus one tick).

        :meth:`disarm` it in a ``finally``. Past the deadline the watchdog shuts down
        ``owner.fileno(connection)`` and calls ``owner.overran(reason)``.
        """
        if self._thread is None:
            self._start()
        now = time.monotonic()
        self._armed[connection] = (now + seconds, owner, now)

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
        try:
            while True:
                time.sleep(self._tick)
                try:
                    self._sweep(time.monotonic(), list(self._armed.items()))
                except Exception:
                    logger.exception("dbresilience watchdog: sweep failed")
        except BaseException:
            logger.critical(
                "dbresilience watchdog thread died: command_timeout is not enforced until it "
                "is restarted",
                exc_info=True,
            )
            raise

    def _sweep(self, now: float, seen: list[tuple[Any, Entry]]) -> None:
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
                self._fire(connection, entry[1], "deadline")

    def cut(self, connection: object, entry: Entry, reason: str) -> bool:
        """Cut the call ``entry`` on ``connection`` off now (the hang monitor's verdict),
        if it is still the one armed; True if it was."""
        armed = self._armed
        if armed.get(connection) is entry and armed.pop(connection, None) is entry:
            self._fire(connection, entry[1], reason)
            return True
        return False

    @staticmethod
    def _fire(connection: object, owner: Guarded, reason: str) -> None:
        try:
            fd = os.dup(owner.fileno(connection))
        except Exception:
            return  # already closed
        cancel: Callable[[], None] | None = None
        try:
            cancel = owner.cutting(connection, reason)  # before the caller wakes up
        except Exception:
            logger.exception("dbresilience watchdog could not prepare a cancel request")
        try:
            with socket.socket(fileno=fd) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except Exception:
            logger.exception("dbresilience watchdog could not shut a socket down")
            return
        if cancel is not None:
            threading.Thread(target=cancel, name="dbresilience-cancel", daemon=True).start()
        owner.overran(reason)


watchdog = Watchdog()
os.register_at_fork(after_in_child=watchdog._after_fork_in_child)
