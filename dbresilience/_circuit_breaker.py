"""A per-engine circuit breaker over connection attempts (pybreaker / Resilience4j style).

States::

    closed --(sustained connect failures)--> open --(cool-down elapsed)--> half-open
      ^                                        ^                               |
      +---------------(probe succeeds)---------+------(probe fails)------------+

* **closed**: connects go through; failures are counted.
* **open**: connects fail at once with :class:`~dbresilience.CircuitOpen`, without touching the
  network. Entered when at least ``failures`` consecutive connect attempts have failed *and*
  the failures have lasted at least ``min_duration`` seconds: a 1-second restart does not open
  it; a server that stays down does.
* **half-open**: after ``cooldown`` seconds, exactly one probe connect is let through; its
  success closes the breaker, its failure re-opens it for another cool-down.

Only connectivity failures count (kinds ``unavailable`` and ``disconnect`` while connecting):
a constraint violation, an auth failure or a statement timeout never opens it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal

__all__ = ["BreakerState", "CircuitBreaker"]

BreakerState = Literal["closed", "open", "half-open"]


class CircuitBreaker:
    """Thread-safe breaker state machine; cheap when closed (one attribute read).

    :param failures: consecutive failed connect attempts needed to open. Default 5.
    :param min_duration: seconds the failures must span before opening. Default 3 s.
    :param cooldown: seconds to stay open before one probe is allowed. Default 5 s.
    :param clock: monotonic clock (seconds); injectable for tests.
    """

    def __init__(
        self,
        *,
        failures: int = 5,
        min_duration: float = 3.0,
        cooldown: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures = failures
        self.min_duration = min_duration
        self.cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._consecutive = 0
        self._first_failure = 0.0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self.times_opened = 0

    @property
    def state(self) -> BreakerState:
        """``closed``, ``open`` or ``half-open`` (open turns half-open once cooled down)."""
        with self._lock:
            if self._state == "open" and self._clock() - self._opened_at >= self.cooldown:
                return "half-open"
            return self._state

    def retry_after(self) -> float:
        """Seconds until a probe may go through (0 when closed or half-open)."""
        with self._lock:
            if self._state != "open":
                return 0.0
            return max(0.0, self.cooldown - (self._clock() - self._opened_at))

    def rejecting(self) -> bool:
        """True while open and still cooling down: callers should fail fast right away."""
        if self._state != "open":  # no lock: the common case costs one attribute read
            return False
        with self._lock:
            return self._state == "open" and self._clock() - self._opened_at < self.cooldown

    def allow(self) -> bool:
        """May a connect attempt go ahead now? (In half-open, only the one probe may.)"""
        if self._state == "closed":  # fast path, no lock: a stale read only delays by one call
            return True
        with self._lock:
            state: BreakerState = self._state  # re-read under the lock
            if state == "closed":
                return True
            if state == "open":
                if self._clock() - self._opened_at < self.cooldown:
                    return False
                self._state = "half-open"
            if self._probe_in_flight:
                return False
            self._probe_in_flight = True
            return True

    def record_success(self) -> None:
        """A connect succeeded: close the breaker and forget past failures."""
        if self._state == "closed" and self._consecutive == 0:
            return
        with self._lock:
            self._state = "closed"
            self._consecutive = 0
            self._probe_in_flight = False

    def abandon(self) -> None:
        """An attempt ended without a verdict (cancelled): free the half-open probe slot."""
        with self._lock:
            self._probe_in_flight = False

    def record_failure(self) -> bool:
        """A connect failed for a connectivity reason. Returns True if this opened the breaker."""
        with self._lock:
            now = self._clock()
            if self._state == "half-open":
                self._open(now)
                return True
            if self._consecutive == 0:
                self._first_failure = now
            self._consecutive += 1
            if (
                self._state == "closed"
                and self._consecutive >= self.failures
                and now - self._first_failure >= self.min_duration
            ):
                self._open(now)
                return True
            return False

    def _open(self, now: float) -> None:
        self._state = "open"
        self._opened_at = now
        self._probe_in_flight = False
        self.times_opened += 1
