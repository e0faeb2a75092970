"""A per-engine circuit breaker over connection attempts: it limits how many attempts reach a
server that is down, without delaying the recovery.

States::

                                   +--(probe fails: next slot after a backoff wait)--+
                                   v                                                 |
    closed --(sustained failures)--> open --(probe slot comes, one caller takes it)--> half-open
      ^                                                                                  |
      +----------------------------------(probe succeeds)--------------------------------+

* **closed**: connects go through; failures are counted.
* **open**: connects fail at once with :class:`~dbresilience.CircuitOpen`, without touching the
  network. Entered when at least ``failures`` consecutive connect attempts have failed *and*
  the failures have lasted at least ``min_duration`` seconds: a 1-second restart does not open
  it; a server that stays down does.
* **half-open**: a probe slot has come (or its probe is in flight). The first caller to
  connect takes the slot; everyone else keeps failing fast. At most one probe is in flight at
  a time. Its success closes the breaker; its failure schedules the next slot ``wait``
  seconds after the probe ended, ``wait`` drawn with full jitter from an exponential backoff:
  ``uniform(0, min(probe_wait_max, probe_wait_initial * 2**n))`` after the *n*-th failed probe
  (tenacity's ``wait_random_exponential``; the first slot after opening: *n* = 0). A cancelled
  probe frees its slot at once.

So while the server is down it sees one connect at a time, a few per second whatever the
number of callers, and a server that comes back is noticed within about ``probe_wait_max``
(plus one connect); no cool-down holds the recovery off. :meth:`CircuitBreaker.retry_after`
tells waiting callers when to try again: the time to the next slot, or a short poll interval
(``probe_wait_initial``) while a probe is in flight, so that they see its success promptly.

Only connectivity failures count (kinds ``unavailable`` and ``disconnect`` while connecting):
a constraint violation, an auth failure or a statement timeout never opens it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Literal

__all__ = ["BreakerState", "CircuitBreaker"]

BreakerState = Literal["closed", "open", "half-open"]
_Phase = Literal["closed", "open"]  # stored; "half-open" is derived from the probe slot

_MIN_POLL = 0.001  # seconds: floor of the poll interval, so that waiters never spin


class CircuitBreaker:
    """Thread-safe breaker state machine; cheap when closed (one attribute read).

    :param failures: consecutive failed connect attempts needed to open. Default 5.
    :param min_duration: seconds the failures must span before opening. Default 3 s.
    :param probe_wait_initial: first backoff step between probes while open, in seconds; also
        the poll interval :meth:`retry_after` gives while a probe is in flight. Default 0.02 s.
    :param probe_wait_max: cap of the probe backoff (seconds). Default 0.25 s.
    :param clock: monotonic clock (seconds); injectable for tests.

    :ivar times_opened: how many times the breaker opened.
    :ivar probes: probe connects let through while open (over the breaker's life).
    """

    def __init__(
        self,
        *,
        failures: int = 5,
        min_duration: float = 3.0,
        probe_wait_initial: float = 0.02,
        probe_wait_max: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if probe_wait_initial < 0 or probe_wait_max < probe_wait_initial:
            raise ValueError("need 0 <= probe_wait_initial <= probe_wait_max")
        self.failures = failures
        self.min_duration = min_duration
        self.probe_wait_initial = probe_wait_initial
        self.probe_wait_max = probe_wait_max
        self._poll = max(probe_wait_initial, _MIN_POLL)
        self._clock = clock
        self._lock = threading.Lock()
        self._state: _Phase = "closed"
        self._consecutive = 0
        self._first_failure = 0.0
        # While open:
        self._probe_in_flight = False
        self._next_probe_at = 0.0  # clock time of the next probe slot
        self._failed_probes = 0  # since it opened: the backoff's exponent
        self.times_opened = 0
        self.probes = 0

    @property
    def state(self) -> BreakerState:
        """``closed``; ``open`` while waiting for the next probe slot; ``half-open`` once the
        slot has come or while its probe is in flight."""
        with self._lock:
            if self._state == "closed":
                return "closed"
            if self._probe_in_flight or self._clock() >= self._next_probe_at:
                return "half-open"
            return "open"

    def retry_after(self) -> float:
        """Seconds until a connect may go through: 0 when closed or a probe slot is free; the
        time to the next slot; ``probe_wait_initial`` (a poll) while a probe is in flight."""
        with self._lock:
            if self._state == "closed":
                return 0.0
            if self._probe_in_flight:
                return self._poll
            return max(0.0, self._next_probe_at - self._clock())

    def rejecting(self) -> bool:
        """True when a caller should fail fast right away: open, and a probe is in flight or
        the next slot has not come."""
        if self._state == "closed":  # no lock: the common case costs one attribute read
            return False
        with self._lock:
            return self._state == "open" and (
                self._probe_in_flight or self._clock() < self._next_probe_at
            )

    def allow(self) -> bool:
        """May a connect attempt go ahead now? While open, only the caller that takes a free
        probe slot may (and it must then report success, failure or :meth:`abandon`)."""
        if self._state == "closed":  # fast path, no lock: a stale read only delays by one call
            return True
        with self._lock:
            state: _Phase = self._state  # re-read under the lock
            if state == "closed":
                return True
            if self._probe_in_flight or self._clock() < self._next_probe_at:
                return False
            self._probe_in_flight = True
            self.probes += 1
            return True

    def after_fork_in_child(self) -> None:
        """In a child after ``fork()``: a new lock (the parent's may have been held) and no
        probe in flight (a parent thread's probe does not exist here)."""
        self._lock = threading.Lock()
        self._probe_in_flight = False

    def record_success(self) -> bool:
        """A connect succeeded (the server answered): close the breaker, forget past failures.
        Returns True if this closed an open breaker."""
        if self._state == "closed" and self._consecutive == 0:
            return False
        with self._lock:
            was_open = self._state == "open"
            self._state = "closed"
            self._consecutive = 0
            self._probe_in_flight = False
            self._failed_probes = 0
            return was_open

    def abandon(self) -> None:
        """An attempt ended without a verdict (cancelled): free the probe slot for another
        caller, at once (the server was not found down)."""
        if self._state == "closed":
            return
        with self._lock:
            self._probe_in_flight = False

    def record_failure(self) -> bool:
        """A connect failed for a connectivity reason. Returns True if this opened the breaker.

        While open, it ends the probe: the next slot comes after the backoff's next wait. (An
        attempt that began before the breaker opened cannot be told from the probe: it ends it
        too, which at worst lets the next probe start one wait early.)
        """
        with self._lock:
            now = self._clock()
            if self._state == "open":
                self._probe_in_flight = False
                self._failed_probes += 1
                self._next_probe_at = now + self._wait(self._failed_probes)
                return False
            if self._consecutive == 0:
                self._first_failure = now
            self._consecutive += 1
            lasted = now - self._first_failure
            if self._consecutive >= self.failures and lasted >= self.min_duration:
                self._state = "open"
                self._probe_in_flight = False
                self._failed_probes = 0
                self._next_probe_at = now + self._wait(0)
                self.times_opened += 1
                return True
            return False

    def _wait(self, failed_probes: int) -> float:
        """Full-jitter exponential wait after ``failed_probes`` failed probes (seconds)."""
        high = min(self.probe_wait_max, self.probe_wait_initial * 2.0 ** min(failed_probes, 64))
        return random.uniform(0.0, high)
